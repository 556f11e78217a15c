"""`dist-train verify`: distributed training against a single-process reference.

Run under any launcher. Every rank trains k steps of the configured model
distributed; rank 0 then trains a single-process reference over the same global
batches (the same micro-batch size, so the same memory as one rank) and
prints, per step, the raw and clipped norms and the loss of both runs and the
largest parameter difference, plus whether all ranks hold identical
parameters. The exit code is 0 only when everything is within tolerance.
"""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from dist_train import config as C
from dist_train.distributed import DistState
from dist_train.strategies import Plan
from dist_train.strategies.ddp import param_checksum
from dist_train.trainer import Setup, build, optimizer_step


@dataclass
class Row:
    step: int
    raw: float
    raw_ref: float
    clipped: float
    clipped_ref: float
    loss: float
    loss_ref: float
    param_diff: float
    raw_rank_spread: float  # max - min of this step's raw norm over ranks


def _rel(a: float, b: float) -> float:
    if a == b:
        return 0.0
    return abs(a - b) / max(abs(b), 1e-12)


def _flat_params(s: Setup) -> torch.Tensor:
    """All parameters, whole, as one vector (a collective where sharded: every rank calls it)."""
    return torch.cat([p.reshape(-1).float() for p in s.strategy.full_parameters(s.model)])


def verify(
    cfg: C.Config,
    dist: DistState,
    device: torch.device,
    steps: int,
    rtol: float,
    atol: float,
    inject: Optional[str] = None,
    out=sys.stdout,
) -> bool:
    """True when the distributed run matches the reference on every step (result on all ranks)."""
    cfg = copy.deepcopy(cfg)
    cfg.train.max_steps, cfg.train.epochs = steps, None
    s = build(cfg, dist, device, sync_grads=inject != "unsynced-grads")
    s.model.train()
    dist_metrics = []
    dist_params = []
    for step in range(steps):
        m = optimizer_step(s, step)
        lo, hi = dist.min_max(m.grad_norm_raw.detach().float())
        dist_metrics.append((m, dist.mean(m.loss), (hi - lo).item()))
        params = _flat_params(s)
        if dist.is_main:
            dist_params.append(params.cpu())
    replicas_identical: Optional[bool] = None  # None: sharded, each rank holds a part
    if s.strategy.replicated:
        lo, hi = dist.min_max(param_checksum(s.strategy.full_parameters(s.model)))
        replicas_identical = bool(torch.equal(lo, hi))

    ok = True
    if dist.is_main:
        ref_cfg = copy.deepcopy(cfg)
        # One process, the whole global batch, in micro-batches of one rank's micro-batch size.
        ref_cfg.train.grad_accum_steps = cfg.train.grad_accum_steps * dist.world_size
        # The same precision, on one process with no strategy in between.
        ref = build(ref_cfg, DistState(), device, plan=Plan("single", s.plan.precision))
        ref.model.train()
        rows = []
        for step in range(steps):
            r = optimizer_step(ref, step)
            m, loss, spread = dist_metrics[step]
            diff = (dist_params[step] - _flat_params(ref).cpu()).abs().max().item()
            rows.append(
                Row(step + 1, m.grad_norm_raw.item(), r.grad_norm_raw.item(), m.grad_norm_clipped.item(),
                    r.grad_norm_clipped.item(), loss.item(), r.loss.item(), diff, spread)
            )
        ok = _report(rows, replicas_identical, dist, s, rtol, atol, inject, out)
    flag = torch.tensor([1.0 if ok else 0.0], device=device)
    lo, _ = dist.min_max(flag)  # every rank returns rank 0's verdict
    return bool(lo.item() == 1.0)


def _report(rows, replicas_identical, dist, s: Setup, rtol, atol, inject, out) -> bool:
    cfg = s.cfg
    print(
        f"dist-train verify: {dist.world_size} rank(s) ({dist.launcher}, backend {dist.backend or 'none'}, strategy "
        f"{s.plan.strategy}: {s.strategy.describe()}) vs a single-process reference; global batch "
        f"{cfg.train.global_batch_size}, grad_accum_steps {cfg.train.grad_accum_steps}, precision "
        f"{s.plan.precision.label}"
        + (f"; injected fault: {inject}" if inject else ""),
        file=out,
    )
    print(f"tolerances: norms and loss relative {rtol:g}; parameters absolute {atol:g}", file=out)
    header = f"{'step':>4} {'raw':>12} {'raw_ref':>12} {'clipped':>12} {'clipped_ref':>12} {'loss':>10} {'loss_ref':>10} {'max|dparam|':>12}  ok"
    print(header, file=out)
    all_ok = True
    for r in rows:
        good = (
            all(math.isfinite(v) for v in (r.raw, r.raw_ref, r.loss, r.loss_ref))
            and _rel(r.raw, r.raw_ref) <= rtol
            and _rel(r.clipped, r.clipped_ref) <= rtol
            and _rel(r.loss, r.loss_ref) <= rtol
            and r.param_diff <= atol
            and r.raw_rank_spread == 0.0
        )
        all_ok &= good
        print(
            f"{r.step:>4} {r.raw:>12.6g} {r.raw_ref:>12.6g} {r.clipped:>12.6g} {r.clipped_ref:>12.6g} "
            f"{r.loss:>10.6g} {r.loss_ref:>10.6g} {r.param_diff:>12.3g}  {'yes' if good else 'NO'}",
            file=out,
        )
    spread = max(r.raw_rank_spread for r in rows)
    print(f"raw norm identical on all ranks: {'yes' if spread == 0 else f'NO (max spread {spread:.3g})'}", file=out)
    if replicas_identical is None:
        print("parameters identical on all ranks: n/a (sharded: each rank holds a part; compared whole above)",
              file=out)
    else:
        print(f"parameters identical on all ranks: {'yes' if replicas_identical else 'NO'}", file=out)
        all_ok &= replicas_identical
    print(f"verdict: {'PASS' if all_ok else 'FAIL'}", file=out)
    return all_ok
