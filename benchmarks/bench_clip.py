"""The norm + clip + optimizer part of a step: dist_train's against clip_grad_norm_ plus the same optimizer.

Both arms update the same kind of state: about 200 fp32 parameter tensors of 100M elements in all, with
fixed gradients, and torch's fused AdamW.

- baseline: `torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)`, then `opt.step()`.
  clip_grad_norm_ multiplies every gradient by its coefficient in a pass of its own, clipped or not.
- package: dist_train's step after the backward (`dist_train.step`): the global norm, the threshold and
  coefficient, then the fused optimizer with `grad_scale = 1/coef` and `found_inf`, which divides each
  gradient by grad_scale as it reads it: no separate pass, no host read. With clip.policy=none there is
  no grad_scale at all.

Passes over memory, per element (fp32, 4 bytes each), estimated from the kernels: the norm reads G (1);
clip_grad_norm_'s scaling reads and writes G (2); fused AdamW reads G, P, M, V and writes P, M, V (7), and
with a grad_scale also writes the unscaled G back (1). So baseline 10, package 9 (clipping policy) or 8
(no clipping). On a memory-bound device the ratio should approach 0.9 and 0.8.

The arms take turns within one process, one step each, the order rotating every round, so a burst of
machine noise hits all of them; we report the median time of each and the ratios to the baseline, for a
threshold below the norm (every step clipped) and above it (none clipped).

    python benchmarks/bench_clip.py [--elements 100e6] [--tensors 200] [--rounds 15] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dist_train.clip import FixedClip, NoClip
from dist_train.step import Strategy, _Decision, _fused_step
from quick import add_quick, apply_quick  # benchmarks/quick.py (the script's folder is on sys.path)

BYTES_PER_ELEMENT = {"baseline": 40, "package": 36, "package, policy none": 32}


def make_params(n_elements: int, n_tensors: int, device: str, seed: int = 0):
    """`n_tensors` parameters of uneven sizes summing to about `n_elements`, with fixed gradients."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(n_tensors, generator=g) + 0.1
    sizes = (weights / weights.sum() * n_elements).long().clamp_min(1)
    params = []
    for n in sizes.tolist():
        p = torch.nn.Parameter(torch.randn(n, generator=g).to(device) * 0.02)
        p.grad = torch.randn(n, generator=g).to(device) * 1e-3
        params.append(p)
    return params


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_arms(args, max_norm: float):
    grads = make_params(args.elements, args.tensors, args.device)
    arms = {}
    for name in ("baseline", "package", "package, policy none"):
        params = [torch.nn.Parameter(p.detach().clone()) for p in grads]
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
        arms[name] = (params, opt)
    saved = [p.grad for p in grads]
    loss = torch.zeros((), device=args.device)  # the step's loss: what spike skipping on the loss would read

    def run(name):
        params, opt = arms[name]
        for p, g in zip(params, saved):
            p.grad = g.clone() if name == "baseline" or name == "package" else g  # a clip writes into them
        sync(args.device)
        t0 = time.perf_counter()
        if name == "baseline":
            torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
            opt.step()
        else:
            policy = NoClip() if name.endswith("none") else FixedClip(max_norm)
            grads = [p.grad for p in params]
            strategy = Strategy()
            decision = _Decision(policy, None, strategy, loss, None, 1e-6, list(zip(params, grads)))
            _fused_step(opt, grads, decision, strategy, None)
        sync(args.device)
        return time.perf_counter() - t0

    return run, list(arms)


def measure(args, max_norm: float) -> dict[str, float]:
    run, names = make_arms(args, max_norm)
    for name in names:  # warm-up: optimizer state, kernels, pages
        run(name)
        run(name)
    times = {name: [] for name in names}
    for r in range(args.rounds):  # one step of each arm in turn, the order rotating: noise hits all alike
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            for _ in range(args.steps):
                times[name].append(run(name))
    return {name: statistics.median(v) for name, v in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--elements", type=float, default=100e6,
                   help="fp32 gradient elements in all (default: %(default).0e)")
    p.add_argument("--tensors", type=int, default=200,
                   help="tensors the elements are split into (default: %(default)s)")
    p.add_argument("--steps", type=int, default=1, help="steps per arm per round (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=15, help="rounds, each arm in turn (default: %(default)s)")
    smoke = add_quick(p, elements=1e6, tensors=20, steps=1, rounds=1)
    args = apply_quick(p, p.parse_args(), smoke)
    args.elements = int(args.elements)
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{args.tensors} tensors, {args.elements / 1e6:.0f}M fp32 elements, {args.rounds} rounds x {args.steps} "
          "steps per arm")
    for label, max_norm in (("clipped (threshold below the norm)", 1e-6), ("not clipped", 1e6)):
        med = measure(args, max_norm)
        base = med["baseline"]
        print(f"{label}:")
        for name, t in med.items():
            gb = BYTES_PER_ELEMENT[name] * args.elements / 1e9
            print(f"  {name:22s} {t * 1e3:8.1f} ms  ratio {t / base:.3f}  ~{gb:.1f} GB moved "
                  f"({gb / t:.1f} GB/s)")


if __name__ == "__main__":
    main()
