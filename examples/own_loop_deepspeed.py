"""Your own DeepSpeed loop with dist_train's Clipper: ZeRO-2, an adaptive threshold handed to the engine.

    deepspeed --num_gpus 2 examples/own_loop_deepspeed.py [--steps 20] [--stage 2] [--accum 1]

`clipper.step(engine)` replaces `engine.step()` at the accumulation boundary: it hands the policy's threshold
(from past norms alone) to the engine, lets the engine reduce, clip and update, and reads back the engine's
own global norm and whether it skipped the step. Rank 0 prints one JSON line of the stats every --every
steps (metrics.jsonl's keys). On a machine without GPUs DeepSpeed picks its CPU accelerator and gloo.
"""

from __future__ import annotations

import argparse
import json
import warnings

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_train import Clipper, release_deepspeed_shm
from own_loop_ddp import batch, model  # the DDP example's data and model (this file's folder is on sys.path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--every", type=int, default=1, help="print the stats every N steps (default: %(default)s)")
    p.add_argument("--stage", type=int, default=2, choices=(0, 1, 2, 3), help="ZeRO stage (default: %(default)s)")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per step (default: %(default)s)")
    p.add_argument("--max-norm", type=float, default=1.0, help="the threshold during the warm-up")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # DeepSpeed's launcher passes it
    args = p.parse_args()
    # DeepSpeed 0.19 calls collectives torch 2.13 deprecates, once per step: nothing to act on here.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated")
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    size = 32
    net = model()
    config = {"train_batch_size": size, "gradient_accumulation_steps": args.accum,
              "train_micro_batch_size_per_gpu": size // (world * args.accum),
              "zero_optimization": {"stage": args.stage}}  # gradient_clipping: the Clipper sets it every step
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-2)
    engine, _, _, _ = deepspeed.initialize(model=net, optimizer=optimizer, config=config)
    release_deepspeed_shm()  # on the CPU, DeepSpeed never frees its shared-memory buffers itself
    clipper = Clipper("zscore", max_norm=args.max_norm, warmup_steps=5)
    for step in range(1, args.steps + 1):
        x, y = batch(step, size)
        mine = slice(rank * size // world, (rank + 1) * size // world)
        xs, ys = x[mine].chunk(args.accum), y[mine].chunk(args.accum)
        for i, (xm, ym) in enumerate(zip(xs, ys)):
            loss = F.cross_entropy(engine(xm.to(engine.device)), ym.to(engine.device))
            engine.backward(loss)  # the engine divides by the accumulation steps
            if i < args.accum - 1:
                engine.step()  # inside the accumulation window: the engine only counts the micro-batch
        stats = clipper.step(engine)  # threshold -> the engine's reduce, clip and update -> its norm, or its skip
        if step % args.every == 0:
            row = {"step": step, "train/loss_rank0": loss.item(), **stats.to_dict()}  # the host reads
            if rank == 0:
                print(json.dumps(row), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
