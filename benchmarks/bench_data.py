"""The token-file loader (data.token_file) against the same batches from an in-memory tensor, and its memory.

Speed: one token file of --speed-gb, read two ways side by side in one process:
the memory-mapped TokenFileDataset, and a TokenDataset over the whole file
loaded into a torch tensor. Both gather the same batches (the trainer's, from
GlobalBatches, computed beforehand) in alternating blocks of --steps batches,
the order flipping every round; we report the median time per batch of each as
samples per second, and their ratio. The file has just been written, so its
pages are in the page cache: this measures the loader, not the disk. The time
GlobalBatches takes to compute a batch's indices (which both pay in training)
is reported on its own line.

Memory: for each of --sizes-gb, a fresh process maps a token file of that size
and reads --memory-batches batches (default: twice what one arm reads) through
the trainer's path (indices, then get). From /proc/self/status, it reports anonymous memory (RssAnon: the
process's own allocations; its peak sampled after every batch) separately from
file-backed resident pages (RssFile): touched pages of the mapping count in the
resident set, but they are clean page cache, which the kernel drops under
pressure. Target: anonymous memory flat in the file size.

Both arms run with --threads torch threads (default 1): a batch's gather is too
small to split, and on a busy machine torch's second thread waits for a core
(measured on a loaded 2-core machine: 5.5 ms a batch in memory with 2 threads,
0.1 ms with 1).

The files go to a temporary folder (--dir, default the system's) and are
deleted at the end.

    python benchmarks/bench_data.py [--steps 100] [--rounds 10] [--sizes-gb 0.25,2] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dist_train.config import DataConfig, TokenDtype
from dist_train.data import GlobalBatches, TokenDataset, TokenFileDataset, inspect_token_file
from quick import add_quick, apply_quick  # benchmarks/quick.py (the script's folder is on sys.path)

VOCAB = 32000  # below 2^15, so the in-memory tensor can be int16 like text_dataset's
GB = 1e9
BLOCK_BYTES = 16 << 20  # random ids generated once and written repeatedly: the content does not matter here


def write_token_file(path: Path, nbytes: int) -> None:
    block = np.random.default_rng(0).integers(0, VOCAB, BLOCK_BYTES // 2, dtype=np.uint16).tobytes()
    with open(path, "wb") as f:
        left = nbytes - nbytes % 2
        while left:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n


def mapped(path: Path, block: int) -> TokenFileDataset:
    cfg = DataConfig(token_file=str(path), token_dtype=TokenDtype.uint16, vocab_size=VOCAB)
    return TokenFileDataset(inspect_token_file(cfg, block), block)


def time_arms(args, path: Path) -> dict:
    file_data = mapped(path, args.block)
    tokens = torch.from_numpy(np.fromfile(path, dtype="<u2").view(np.int16))  # ids < 2^15: the same values
    arms = {"token file": file_data, "in memory": TokenDataset(tokens, args.block, args.block, VOCAB)}
    batches = GlobalBatches(len(file_data), args.batch, seed=0)
    order_times = []
    indices = []
    for step in range(args.steps * args.rounds):
        t0 = time.perf_counter()
        indices.append(batches.indices(step))
        order_times.append(time.perf_counter() - t0)
    for data in arms.values():  # warm-up: allocator, code paths
        for idx in indices[: min(5, len(indices))]:
            data.get(idx)
    times = {name: [] for name in arms}
    for r in range(args.rounds):
        names = list(arms) if r % 2 == 0 else list(arms)[::-1]
        for name in names:
            for idx in indices[r * args.steps : (r + 1) * args.steps]:
                t0 = time.perf_counter()
                x, y = arms[name].get(idx)
                times[name].append(time.perf_counter() - t0)
    return {"batch_s": {name: statistics.median(v) for name, v in times.items()},
            "order_s": statistics.median(order_times), "samples": len(file_data)}


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def memory_child(args) -> None:
    """In a fresh process: map the file, read batches the trainer's way, print memory figures as JSON."""
    data = mapped(Path(args.memory_file), args.block)
    batches = GlobalBatches(len(data), args.batch, seed=0)
    data.get(batches.indices(0))  # first use: whatever is allocated once
    base = _status()
    peak_anon = base["RssAnon"]
    for step in range(1, args.memory_batches + 1):
        data.get(batches.indices(step))
        peak_anon = max(peak_anon, _status()["RssAnon"])
    end = _status()
    print(json.dumps({"samples": len(data), "anon_base": base["RssAnon"], "anon_peak": peak_anon,
                      "file_base": base["RssFile"], "file_end": end["RssFile"]}))


def memory_in_subprocess(args, path: Path) -> dict:
    cmd = [sys.executable, __file__, "--memory-file", str(path), "--block", str(args.block),
           "--batch", str(args.batch), "--memory-batches", str(args.memory_batches)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100, help="batches per arm per round (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=10, help="rounds, the arms in turn (default: %(default)s)")
    p.add_argument("--block", type=int, default=256, help="tokens per sample, model.block_size (default: %(default)s)")
    p.add_argument("--batch", type=int, default=64, help="samples per batch (default: %(default)s)")
    p.add_argument("--speed-gb", type=float, default=0.25,
                   help="size of the token file of the speed comparison (default: %(default)s)")
    p.add_argument("--sizes-gb", default="0.25,2",
                   help="token file sizes of the memory comparison (default: %(default)s)")
    p.add_argument("--memory-batches", type=int,
                   help="batches each memory process reads (default: 2 x steps x rounds)")
    p.add_argument("--dir", help="where to write the files (default: the system's temporary folder)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    p.add_argument("--memory-file", help=argparse.SUPPRESS)
    smoke = add_quick(p, steps=5, rounds=1, speed_gb=0.002, sizes_gb="0.002,0.004", memory_batches=20)
    args = apply_quick(p, p.parse_args(), smoke)
    torch.set_num_threads(args.threads)
    if args.memory_file:
        memory_child(args)
        return
    if args.memory_batches is None:
        args.memory_batches = 2 * args.steps * args.rounds
    sizes = [float(s) for s in args.sizes_gb.split(",")]
    need = int(max(sizes + [args.speed_gb]) * GB) + (1 << 30)
    with tempfile.TemporaryDirectory(prefix="bench_data_", dir=args.dir) as tmp:
        free = shutil.disk_usage(tmp).free
        if free < need:
            sys.exit(f"bench_data: {free / GB:.1f} GB free in {tmp}, {need / GB:.1f} GB needed; use --dir or "
                     "smaller --sizes-gb")
        path = Path(tmp) / "tokens.bin"
        write_token_file(path, int(args.speed_gb * GB))
        speed = time_arms(args, path)
        memory = {}
        for size in sizes:
            write_token_file(path, int(size * GB))  # one file at a time on disk
            memory[size] = memory_in_subprocess(args, path)
    rate = {name: args.batch / s for name, s in speed["batch_s"].items()}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, block {args.block} tokens, batch "
          f"{args.batch} samples, {args.rounds} rounds x {args.steps} batches per arm, uint16 ids")
    print(f"speed ({args.speed_gb:g} GB file, {speed['samples']} samples, page cache warm): token file "
          f"{rate['token file']:.0f} samples/s ({speed['batch_s']['token file'] * 1e6:.0f} us/batch), in memory "
          f"{rate['in memory']:.0f} samples/s ({speed['batch_s']['in memory'] * 1e6:.0f} us/batch), ratio "
          f"{rate['token file'] / rate['in memory']:.3f}")
    print(f"batch order (GlobalBatches.indices, paid by both in training): {speed['order_s'] * 1e6:.0f} us/batch")
    print(f"memory after {args.memory_batches} batches (fresh process per file):")
    for size, m in memory.items():
        print(f"  {size:g} GB, {m['samples']} samples: anonymous peak {m['anon_peak'] / 2**20:.1f} MiB "
              f"(+{(m['anon_peak'] - m['anon_base']) / 2**20:.2f} MiB while reading), file-backed resident "
              f"+{(m['file_end'] - m['file_base']) / 2**20:.1f} MiB (touched pages, clean page cache); a stored "
              f"permutation would add {8 * m['samples'] / 2**20:.1f} MiB")
    lo, hi = memory[min(memory)], memory[max(memory)]
    print(f"anonymous peak, {max(memory):g} GB / {min(memory):g} GB file: {hi['anon_peak'] / lo['anon_peak']:.3f}")


if __name__ == "__main__":
    main()
