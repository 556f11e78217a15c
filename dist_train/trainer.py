"""The training loop: builds the pieces from a Config, runs `train_step`, logs."""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from dist_train import config as C
from dist_train import ddp
from dist_train.amp import build_amp, pick_device
from dist_train.clip import ClipPolicy, build_policy
from dist_train.data import GlobalBatches, TokenDataset, build_dataset, split_for_rank
from dist_train.distributed import DistState
from dist_train.errors import TrainingError, UsageError
from dist_train.metrics import JsonlSink, Sink, Window, make_record
from dist_train.model import build_model
from dist_train.progress import ProgressReporter
from dist_train.step import Amp, GradSync, LocalGradSync, StepMetrics, train_step

#: Files a run writes into its run directory.
RUN_FILES = ("metrics.jsonl", "config.yaml", "checkpoint.pt", "plot.png", "wandb")


def lr_lambda(cfg: C.OptimConfig, max_steps: int):
    """Multiplier of optim.lr at optimizer step s (0-based): linear warm-up, then constant or cosine."""

    def f(s: int) -> float:
        if s < cfg.warmup_steps:
            return (s + 1) / cfg.warmup_steps
        if cfg.schedule == C.Schedule.constant:
            return 1.0
        span = max(max_steps - cfg.warmup_steps, 1)
        progress = min((s - cfg.warmup_steps) / span, 1.0)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return f


@dataclass
class Setup:
    """Everything a run needs, built before the run directory is touched."""

    cfg: C.Config
    dist: DistState
    device: torch.device
    dataset: TokenDataset
    batches: GlobalBatches
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    policy: ClipPolicy
    amp: Amp
    grad_sync: GradSync


def build(
    cfg: C.Config,
    dist: Optional[DistState] = None,
    device: Optional[torch.device] = None,
    sync_grads: bool = True,
) -> Setup:
    """Build model, data, optimizer, policy and precision for this rank.

    `sync_grads=False` leaves a distributed model unwrapped, so gradients are never
    averaged: only `dist-train verify --inject unsynced-grads` uses it, to show the
    verifier catches that.
    """
    dist = dist or DistState()
    device = device or pick_device(cfg.train.device, dist.local_rank)
    t = cfg.train
    if t.global_batch_size % (dist.world_size * t.grad_accum_steps):
        raise UsageError(
            f"config key 'train.global_batch_size': {t.global_batch_size} is not divisible by "
            f"world_size*grad_accum_steps={dist.world_size}*{t.grad_accum_steps}"
        )
    dataset = build_dataset(cfg.data, cfg.model.block_size, t.seed)
    batches = GlobalBatches(len(dataset), t.global_batch_size, t.seed)
    torch.manual_seed(t.seed)  # the same initial weights on every rank and every world size
    model = build_model(cfg.model, dataset.vocab_size).to(device)
    grad_sync: GradSync = LocalGradSync()
    if dist.distributed and sync_grads:
        model = ddp.wrap(model, device)
        grad_sync = ddp.DDPGradSync()
    torch.manual_seed(t.seed + dist.rank)  # per-rank randomness (dropout) from here on
    o = cfg.optim
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o, t.max_steps))
    return Setup(
        cfg=cfg,
        dist=dist,
        device=device,
        dataset=dataset,
        batches=batches,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        policy=build_policy(cfg.clip),
        amp=build_amp(t.precision, device),
        grad_sync=grad_sync,
    )


def micro_batches(s: Setup, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's micro-batches of optimizer step `step` (0-based), on the device."""
    idx = s.batches.indices(step)
    parts = split_for_rank(idx, s.dist.rank, s.dist.world_size, s.cfg.train.grad_accum_steps)
    out = []
    for p in parts:
        x, y = s.dataset.get(p)
        out.append((x.to(s.device, non_blocking=True), y.to(s.device, non_blocking=True)))
    return out


def optimizer_step(s: Setup, step: int) -> StepMetrics:
    """Optimizer step `step` (0-based) of a built setup: the training step, then the LR schedule."""
    m = train_step(
        s.model, s.optimizer, micro_batches(s, step), s.policy, amp=s.amp, grad_sync=s.grad_sync, eps=s.cfg.clip.eps
    )
    s.scheduler.step()
    return m


def prepare_run_dir(cfg: C.Config) -> Path:
    """Create the run directory; refuse to clobber an earlier run unless run.overwrite."""
    run_dir = Path(cfg.run.out_dir)
    existing = [name for name in RUN_FILES if (run_dir / name).exists()]
    if existing and not cfg.run.overwrite:
        raise UsageError(
            f"run directory '{run_dir}' already holds a run ({', '.join(existing)}); "
            "choose another run.out_dir or pass run.overwrite=true"
        )
    for name in existing:
        p = run_dir / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(C.to_yaml(cfg), encoding="utf-8")
    return run_dir


def save_checkpoint(s: Setup, path: Path, step: int, skipped_total: int) -> None:
    state = {
        "step": step,
        "skipped_steps": skipped_total,
        "model": ddp.unwrap(s.model).state_dict(),
        "optimizer": s.optimizer.state_dict(),
        "scheduler": s.scheduler.state_dict(),
        "clip_policy": {"name": s.policy.name, "state": s.policy.state_dict()},
        "scaler": s.amp.scaler.state_dict() if s.amp.scaler is not None else None,
        "config": C.to_dict(s.cfg),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # never leave a half-written checkpoint behind


def open_sinks(cfg: C.Config, run_dir: Path) -> list[Sink]:
    sinks: list[Sink] = [JsonlSink(run_dir / "metrics.jsonl")]
    if cfg.logging.wandb.mode != C.WandbMode.disabled:
        from dist_train.wandb_sink import WandbSink

        sinks.append(WandbSink(cfg.logging.wandb, run_dir, cfg.run.name or run_dir.name, C.to_dict(cfg)))
    return sinks


def run(s: Setup, sinks: list[Sink], progress: ProgressReporter) -> dict[str, Any]:
    """The loop. Returns the last logged record."""
    cfg = s.cfg
    t = cfg.train
    window = Window(s.device)
    skipped_total = 0
    consecutive = 0
    last: dict[str, Any] = {}
    s.model.train()
    for step in range(t.max_steps):
        lr = s.optimizer.param_groups[0]["lr"]
        m = optimizer_step(s, step)
        window.add(m, t.global_batch_size)
        if m.skipped:
            skipped_total += 1
            consecutive += 1
        else:
            consecutive = 0
        n = step + 1
        record = None
        if n % cfg.logging.every == 0 or n == t.max_steps or m.skipped:
            loss = s.dist.mean(m.loss)  # collective: every rank takes part
            if s.dist.is_main:
                record = make_record(
                    step=n,
                    loss=loss,
                    m=m,
                    window=window,
                    lr=lr,
                    skipped_total=skipped_total,
                    tokens_per_sample=cfg.model.block_size,
                )
                for sink in sinks:
                    sink.log(record)
                last = record
            window.reset()
        if m.skipped:
            progress.message(f"step {n}: non-finite gradient norm, optimizer step skipped ({consecutive} in a row)")
        progress.step(record)
        if cfg.dist.check_sync_every and n % cfg.dist.check_sync_every == 0:
            ddp.check_replicas(s.model, s.dist, n)
        if consecutive >= cfg.clip.max_consecutive_nonfinite:
            raise TrainingError(
                f"training stopped at step {n}: {consecutive} consecutive optimizer steps had a non-finite "
                f"gradient norm (clip.max_consecutive_nonfinite={cfg.clip.max_consecutive_nonfinite}); "
                "lower optim.lr, check the data, or try train.precision=bf16"
            )
    return last


def train(cfg: C.Config, dist: Optional[DistState] = None, device: Optional[torch.device] = None) -> Path:
    """Build everything, then create the run directory, train, log, plot, checkpoint.

    Rank 0 alone writes metrics, W&B, the plot and the checkpoint.
    """
    s = build(cfg, dist, device)
    run_dir = Path(cfg.run.out_dir)
    sinks: list[Sink] = []
    s.dist.on_main(lambda: prepare_run_dir(cfg))  # an error here stops every rank
    progress = ProgressReporter(cfg.logging.progress, cfg.train.max_steps, enabled=s.dist.is_main)
    failed = True
    try:
        if s.dist.is_main:
            sinks = open_sinks(cfg, run_dir)
        last = run(s, sinks, progress)
        if s.dist.is_main and cfg.train.checkpoint:
            save_checkpoint(s, run_dir / "checkpoint.pt", cfg.train.max_steps, last.get("optim/skipped_steps", 0))
        failed = False
    finally:
        progress.close()
        for sink in sinks:
            sink.close(failed)
        if s.dist.is_main and (run_dir / "metrics.jsonl").exists():
            from dist_train.plot import plot_run

            plot_run(run_dir)
    return run_dir
