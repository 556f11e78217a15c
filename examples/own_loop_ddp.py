"""Your own torchrun loop with dist_train's Clipper: DDP, fused AdamW, zscore clipping and spike skipping.

    torchrun --nproc_per_node=2 examples/own_loop_ddp.py [--steps 20] [--fsdp | --fp16]

Rank 0 prints one JSON line of the Clipper's stats every --every steps (metrics.jsonl's keys): the
global norm before and after clipping, the same on every rank. Runs on CPUs (gloo) or GPUs (nccl).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_train import Clipper


def batch(step: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a step (the same on every rank; each takes its own rows)."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn(size, 20, generator=g)
    return x, (x[:, :5].sum(dim=1) > 0).long() + 2 * (x[:, 5:10].sum(dim=1) > 0).long()


def model() -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank
    return torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--every", type=int, default=1, help="print the stats every N steps (default: %(default)s)")
    p.add_argument("--fsdp", action="store_true", help="FSDP2's fully_shard instead of DDP")
    p.add_argument("--fp16", action="store_true", help="fp16 autocast with torch's GradScaler (DDP)")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    net = model().to(device)
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        fully_shard(net)
    else:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if cuda else None)
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-2, fused=True)  # fused: no host read in clipper.step
    clipper = Clipper("zscore", max_norm=1.0, warmup_steps=5, skip_sigma=6.0, skip_min_steps=5, skip_window=16)
    scaler = torch.amp.GradScaler(device.type, enabled=args.fp16)
    for step in range(1, args.steps + 1):
        x, y = batch(step)
        mine = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        with torch.autocast(device.type, dtype=torch.float16, enabled=args.fp16):
            loss = F.cross_entropy(net(x[mine].to(device)), y[mine].to(device))
        scaler.scale(loss).backward()  # without --fp16 the scaler is off: loss.backward()
        # unscale (folded into the fused AdamW) -> global norm -> threshold -> clip -> step, or skip -> scale update
        stats = clipper.step(net, optimizer, scaler)
        optimizer.zero_grad(set_to_none=True)
        if step % args.every == 0:
            row = {"step": step, "train/loss_rank0": loss.item(), **stats.to_dict()}  # the host reads
            if rank == 0:
                print(json.dumps(row), flush=True)
    dist.barrier()  # leave together: gloo can abort a rank whose peer tears down its connections first
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
