"""Your own Accelerate loop with dist_train's Clipper: fp16 or bf16, gradient accumulation, zscore clipping.

    accelerate launch --num_processes 2 --mixed_precision fp16 examples/own_loop_accelerate.py [--steps 20]
    # on CPUs (Accelerate needs both to start 2 CPU processes):
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 --mixed_precision fp16 \
        examples/own_loop_accelerate.py

`clipper.step(model, optimizer)` takes what `accelerator.prepare` returned: it finds Accelerate's GradScaler,
unscales (inside the fused optimizer's own pass), takes the global norm, clips and steps, and updates the
scale; do not call accelerator.clip_grad_norm_ or scaler.step yourself. Call it only where
`accelerator.sync_gradients` is True. Rank 0 prints one JSON line of the stats every --every steps.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from dist_train import Clipper
from own_loop_ddp import batch, model  # the DDP example's data and model (this file's folder is on sys.path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--every", type=int, default=1, help="print the stats every N steps (default: %(default)s)")
    p.add_argument("--accum", type=int, default=2, help="micro-batches per step (default: %(default)s)")
    args = p.parse_args()
    acc = Accelerator(gradient_accumulation_steps=args.accum)
    if acc.mixed_precision == "fp16" and acc.scaler is None and acc.device.type == "cpu":
        # Accelerate 1.x trains fp32 on a CPU when asked for fp16, without a word; torch's CPU GradScaler
        # makes it the precision asked for (on GPUs Accelerate builds its own scaler).
        acc.native_amp, acc.scaler = True, torch.amp.GradScaler("cpu")
    net = model()
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-2, fused=True)  # fused: no host read in clipper.step
    net, optimizer = acc.prepare(net, optimizer)
    clipper = Clipper("zscore", max_norm=1.0, warmup_steps=5)
    size, rank, world = 32, acc.process_index, acc.num_processes
    for step in range(1, args.steps + 1):
        x, y = batch(step, size)
        mine = slice(rank * size // world, (rank + 1) * size // world)
        for xm, ym in zip(x[mine].chunk(args.accum), y[mine].chunk(args.accum)):
            with acc.accumulate(net):
                loss = F.cross_entropy(net(xm.to(acc.device)), ym.to(acc.device))
                acc.backward(loss)  # scales an fp16 loss; divides by the accumulation steps
                if acc.sync_gradients:  # the window's last micro-batch: gradients are synchronised
                    stats = clipper.step(net, optimizer)  # unscale -> global norm -> clip -> step, or skip
                    optimizer.zero_grad(set_to_none=True)
        if step % args.every == 0:
            row = {"step": step, "train/loss_rank0": loss.item(), **stats.to_dict()}  # the host reads
            if acc.is_main_process:
                print(json.dumps(row), flush=True)
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    main()
