"""The 2-process DDP training step against a bare hand-written DDP loop.

Two ranks (gloo on CPU, NCCL on GPU) each hold both arms: dist_train's
train_step on a DDP-wrapped TinyGPT, and a bare DDP loop (forward, backward,
torch.nn.utils.clip_grad_norm_(foreach=True), fused AdamW step, zero_grad) on a copy of the same model,
fed the same batches. The arms alternate in blocks of steps (order flipped
every round) so machine noise hits both; rank 0 prints the median step time of
each and their ratio.

    python benchmarks/bench_ddp.py [--world-size 2] [--steps 10] [--rounds 10]
"""

from __future__ import annotations

import argparse
import copy
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_train.clip import FixedClip
from dist_train.config import ModelConfig
from dist_train.data import split_for_rank, synthetic_dataset
from dist_train.strategies.ddp import DDPStrategy
from dist_train.model import TinyGPT
from dist_train.step import Amp, lm_loss, train_step
from quick import add_quick, apply_quick  # benchmarks/quick.py (the script's folder is on sys.path)

MAX_NORM = 1.0


def _worker(rank: int, args, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(args.threads)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=args.world_size)

    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=args.layers, n_head=4, d_model=args.d_model, block_size=args.block)
    base = TinyGPT(cfg, 64).to(device)
    data = synthetic_dataset(args.batch * 32, 64, args.block, seed=0)
    batches = []
    for i in range(32):
        idx = torch.arange(i * args.batch, (i + 1) * args.batch)
        (mine,) = split_for_rank(idx, rank, args.world_size, 1)
        batches.append(tuple(t.to(device) for t in data.get(mine)))

    def arm(kind):
        model = DDP(copy.deepcopy(base), device_ids=[rank] if cuda else None)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        policy, i = FixedClip(MAX_NORM), [0]
        sync = DDPStrategy(None, device, Amp())

        def package():
            train_step(model, opt, [batches[i[0] % 32]], policy, strategy=sync)
            i[0] += 1

        def bare():
            lm_loss(model, batches[i[0] % 32]).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
            i[0] += 1

        return package if kind == "package" else bare

    arms = {k: arm(k) for k in ("package", "bare")}
    times = {k: [] for k in arms}
    for fn in arms.values():
        for _ in range(3):
            fn()
    for r in range(args.rounds):
        for k in (["package", "bare"] if r % 2 == 0 else ["bare", "package"]):
            for _ in range(args.steps):
                dist.barrier()
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                arms[k]()
                if cuda:
                    torch.cuda.synchronize()
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    if rank == 0:
        print(f"device {args.device}, {args.world_size} ranks, torch {torch.__version__}, threads/rank "
              f"{args.threads}, {args.rounds} rounds x {args.steps} steps per arm")
        print(f"median step time (rank 0): package {med['package'] * 1e3:.2f} ms, bare DDP {med['bare'] * 1e3:.2f} ms, "
              f"ratio {med['package'] / med['bare']:.4f}")
    dist.destroy_process_group()
    # End without the interpreter's shutdown, as dist_train.cli.entry does for a rank: a gloo worker thread
    # that releases a finished collective's tensors while the interpreter shuts down aborts the process
    # ("terminate called without an active exception", SIGABRT; seen in a --quick run in CI).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.device_count() >= 2 else "cpu",
                   help="torch device type (default: cuda with 2 or more GPUs, else cpu)")
    p.add_argument("--world-size", type=int, default=2, help="DDP ranks (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank, CPU (default: %(default)s)")
    p.add_argument("--steps", type=int, default=10, help="steps per arm per round (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=10, help="rounds, the arms in turn (default: %(default)s)")
    p.add_argument("--layers", type=int, default=4, help="TinyGPT layers (default: %(default)s)")
    p.add_argument("--d-model", type=int, default=128, help="TinyGPT width (default: %(default)s)")
    p.add_argument("--block", type=int, default=64, help="tokens per sample (default: %(default)s)")
    p.add_argument("--batch", type=int, default=32, help="global batch, samples (default: %(default)s)")
    smoke = add_quick(p, steps=2, rounds=1, layers=1, d_model=32)
    args = apply_quick(p, p.parse_args(), smoke)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(args, port), nprocs=args.world_size, join=True)


if __name__ == "__main__":
    main()
