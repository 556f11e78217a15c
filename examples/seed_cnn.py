"""The article's program, fixed: its CNN classifier, and a small data set to train it on.

The article ("gradient explosion and how to fix it, from paper to practice") trains this
network with plain SGD at lr 0.01, batch 16, cross-entropy, for 10 epochs, on the tensors of
`torch.load('train_data.pth')`. Two things in it do not work (README, "From the article to
dist_train"); here the network's shapes are made to fit, and dist_train does the clipping:

    dist-train train --config configs/seed_cnn.yaml

Write the data first (no download: 10 classes of 32x32 colour images drawn from a seed):

    python examples/seed_cnn.py runs/seed_cnn_data
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn

NUM_CLASSES = 10
SIZE = 32


class Net(nn.Module):
    """The article's CNN: conv 3->64, conv 64->64, fc -> 512 -> 10, ReLU between.

    Its shapes are made to fit with pooling: each padded 3x3 convolution keeps 32x32, and a 2x2
    max-pool after each halves it, so the second leaves 64 channels of 8x8 and fc1 takes
    64 * 8 * 8 = 4096 features. (The article's fc1 expects 128 * 8 * 8 = 8192 without any pooling:
    its `view(-1, 128 * 8 * 8)` then cuts each image's 64 * 32 * 32 features into 8 rows, and
    the loss fails on 8 times as many outputs as labels.)
    """

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(64, 64, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(64 * 8 * 8, 512)
        self.fc2 = nn.Linear(512, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = x.flatten(1)
        x = torch.relu(self.fc1(x))
        return self.fc2(x)


def make_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n images (n, 3, 32, 32) float32 and their labels (n,) int64, from `seed` alone.

    Class c has a colour of its own and stripes of its own (direction and frequency), at a random
    phase and brightness per image, under Gaussian noise: learnable, but not from one pixel. Chance
    is 10%; the article's network passes 90% within a few epochs.
    """
    g = torch.Generator().manual_seed(seed)
    classes = torch.Generator().manual_seed(1234)  # the classes are the same for every seed
    colours = torch.rand(NUM_CLASSES, 3, generator=classes) * 0.8 + 0.1
    freq = torch.randint(1, 5, (NUM_CLASSES,), generator=classes).float()
    horizontal = torch.arange(NUM_CLASSES) % 2 == 0
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    coords = torch.arange(SIZE).float() / SIZE * 2 * torch.pi
    phase = torch.rand(n, generator=g) * 2 * torch.pi
    wave = torch.sin(freq[labels, None] * coords[None, :] + phase[:, None])  # (n, 32)
    stripes = torch.where(horizontal[labels, None, None], wave[:, :, None].expand(n, SIZE, SIZE),
                          wave[:, None, :].expand(n, SIZE, SIZE))
    brightness = 0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=g)
    images = colours[labels][:, :, None, None] * brightness * (1 + 0.5 * stripes[:, None])
    images = images + 0.35 * torch.randn(n, 3, SIZE, SIZE, generator=g)
    return images.float(), labels


def write(out_dir: Path, train: int, val: int, seed: int) -> tuple[Path, Path]:
    """out_dir/train_data.pth and out_dir/val_data.pth: (images, labels) tuples, as torch.save writes them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / "train_data.pth", out_dir / "val_data.pth"
    for path, n, s in zip(paths, (train, val), (seed, seed + 1)):
        tmp = path.with_name(path.name + ".tmp")
        torch.save(make_images(n, s), tmp)
        tmp.replace(path)  # complete or absent
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write train_data.pth and val_data.pth: CIFAR-shaped (3x32x32) images "
                                "of 10 classes drawn from a seed, as (images, labels) tensors.")
    p.add_argument("out_dir", type=Path, help="folder to write the two files into (created if missing)")
    p.add_argument("--train", type=int, default=2000, help="training images (default 2000)")
    p.add_argument("--val", type=int, default=500, help="validation images (default 500)")
    p.add_argument("--seed", type=int, default=0, help="seed of the images (default 0)")
    args = p.parse_args(argv)
    if args.train < 1 or args.val < 1:
        print("seed_cnn.py: --train and --val must be at least 1", file=sys.stderr)
        return 2
    train, val = write(args.out_dir, args.train, args.val, args.seed)
    print(f"wrote {train} ({args.train} images) and {val} ({args.val} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
