"""Building a run from a Config: the data, the task, the model, the optimizer, the clip policy and the strategy,
before the run directory is touched; and the batches each optimizer step trains on."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

from dist_train import config as C
from dist_train import strategies
from dist_train.amp import pick_device
from dist_train.clip import ClipPolicy, SpikeSkip, build_policy, build_spike_skip
from dist_train.data import GlobalBatches, build_dataset, split_for_rank
from dist_train.distributed import DistState
from dist_train.errors import ConfigError
from dist_train.model import build_model
from dist_train.optim import build_optimizer
from dist_train.preflight import skipped_batches
from dist_train.samples import Batch, Samples, map_tensors, from_factory, hold_out, load_tensor_file, to_device
from dist_train.step import StepMetrics, train_step
from dist_train.strategies.base import Strategy
from dist_train.tasks import Task, build_task, resolve_name, run_probe


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
    dataset: Samples
    """The training samples."""
    batches: GlobalBatches
    task: Task
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    policy: ClipPolicy
    plan: strategies.Plan
    strategy: Strategy
    max_steps: int
    """train.max_steps, or train.epochs x the steps of an epoch."""
    val: Optional[Samples] = None
    """The validation samples (data.val_file, the factory's "val", data.val_fraction), if any."""
    skip: Optional[SpikeSkip] = None
    #: The names of the parameters the step trains, in its order (per-layer norms, spike forensics).
    param_names: tuple[str, ...] = ()
    #: Global batches left out (data.skip_steps and its file), 1-based, sorted.
    skipped_batches: tuple[int, ...] = ()

    @property
    def steps_per_epoch(self) -> int:
        return self.batches.steps_per_epoch


def build_data(cfg: C.Config) -> tuple[Samples, Optional[Samples]]:
    """(training samples, validation samples or None) from the data.* keys."""
    d, t = cfg.data, cfg.train
    val: Optional[Samples] = None
    if C.token_data(d):
        train: Samples = build_dataset(d, cfg.model.block_size, t.seed)
    elif d.file is not None:
        train = load_tensor_file(d.file, "data.file")
        if d.val_file is not None:
            val = load_tensor_file(d.val_file, "data.val_file")
    else:
        train, val = from_factory(d.factory, d, t.seed)
    if d.vocab_size is not None and train.vocab_size is None:
        train.vocab_size = d.vocab_size  # token ids in a data.file or a factory's samples (task lm)
    if d.val_fraction:
        if val is not None:
            raise ConfigError(f"config key 'data.val_fraction': data.factory '{d.factory}' returns a 'val' set "
                              "already; remove data.val_fraction")
        train, val = hold_out(train, d.val_fraction, t.seed)
    return train, val


def build(
    cfg: C.Config,
    dist: Optional[DistState] = None,
    device: Optional[torch.device] = None,
    plan: Optional[strategies.Plan] = None,
    sync_grads: bool = True,
) -> Setup:
    """Build data, task, model, optimizer, policy and the strategy for this rank.

    `plan` defaults to what the config and the launcher's environment ask for.
    `sync_grads=False` runs every rank as a single process, so gradients are never
    averaged: only `dist-train verify --inject unsynced-grads` uses it, to show the
    verifier catches that.
    """
    dist = dist or DistState()
    device = device or pick_device(cfg.train.device, dist.local_rank)
    plan = plan or strategies.resolve(cfg)
    if not sync_grads:
        plan = strategies.Plan("single", plan.precision)
    t = cfg.train
    if t.global_batch_size % (dist.world_size * t.grad_accum_steps):
        raise ConfigError(
            f"config key 'train.global_batch_size': {t.global_batch_size} is not divisible by "
            f"world_size*grad_accum_steps={dist.world_size}*{t.grad_accum_steps}"
        )
    dataset, val = build_data(cfg)
    task = build_task(cfg, resolve_name(cfg, dataset), dataset, val)
    batches = GlobalBatches(len(dataset), t.global_batch_size, t.seed, shuffle=cfg.data.shuffle,
                            what=dataset.what)
    max_steps = t.max_steps if t.max_steps is not None else t.epochs * batches.steps_per_epoch
    torch.manual_seed(t.seed)  # the same initial weights on every rank and every world size
    model = build_model(cfg.model, task, dataset.vocab_size).to(device)
    if cfg.model.factory is not None or task.name != "lm":
        probe = to_device(dataset.batch(torch.arange(min(2, len(dataset)))), device)
        task = run_probe(task, model, probe, device, f"config key 'model.factory': the model of '{cfg.model.factory}'"
                         if cfg.model.factory else "the embedded model")
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"the model of '{cfg.model.factory}' has no parameter that requires a gradient: nothing "
                          "would train; check requires_grad (a frozen backbone needs at least a trainable head)")
    strategy = strategies.create(plan, dist, device, cfg)
    model, optimizer = strategy.setup(model, lambda params: build_optimizer(cfg.optim, params,
                                                                            strategy.fused_optimizer))
    torch.manual_seed(t.seed + dist.rank)  # per-rank randomness (dropout) from here on
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, max_steps))
    skip = build_spike_skip(cfg.clip)
    names = tuple(n for n, p in strategy.unwrap(model).named_parameters() if p.requires_grad)
    return Setup(
        cfg=cfg,
        dist=dist,
        device=device,
        dataset=dataset,
        val=val,
        batches=batches,
        task=task,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        policy=build_policy(cfg.clip).to(device),
        plan=plan,
        strategy=strategy,
        max_steps=max_steps,
        skip=skip.to(device) if skip is not None else None,
        param_names=names,
        skipped_batches=tuple(skipped_batches(cfg.data)),
    )


def per_layer_every(s: Setup) -> int:
    """logging.per_layer_every, or 0 where the strategy's engine reports the total norm only (DeepSpeed)."""
    return 0 if s.strategy.engine_steps else s.cfg.logging.per_layer_every


def batch_of(s: Setup, step: int) -> int:
    """The global batch (0-based, in the data order) optimizer step `step` (0-based) trains on: the step-th
    batch that data.skip_steps does not leave out."""
    b = step
    for skipped in s.skipped_batches:  # sorted, 1-based
        if skipped - 1 <= b:
            b += 1
        else:
            break
    return b


def rank_parts(s: Setup, step: int) -> list[torch.Tensor]:
    """The sample indices of this rank's micro-batches of optimizer step `step` (0-based)."""
    idx = s.batches.indices(batch_of(s, step))
    return split_for_rank(idx, s.dist.rank, s.dist.world_size, s.cfg.train.grad_accum_steps)


def on_device(s: Setup, batch: Batch, indices: torch.Tensor, samples: Samples) -> Batch:
    """A host batch checked by the task (labels in range: a host read of a host tensor), then on the device
    (asynchronously from page-locked memory on CUDA), in the strategy's input dtype."""
    s.task.check_batch(batch, indices, samples)
    return s.strategy.cast_inputs(to_device(batch, s.device))


def micro_batches(s: Setup, step: int) -> list[Batch]:
    """This rank's micro-batches of optimizer step `step` (0-based), on the device."""
    return [on_device(s, s.dataset.batch(p), p, s.dataset) for p in rank_parts(s, step)]


def optimizer_step(s: Setup, step: int, halt: Optional[torch.Tensor] = None,
                   batches: Optional[list[Batch]] = None) -> StepMetrics:
    """Optimizer step `step` (0-based) of a built setup: the training step, then the LR schedule. `batches`:
    this step's micro-batches, already loaded (data workers); by default they are read now."""
    m = train_step(
        s.model, s.optimizer, batches if batches is not None else micro_batches(s, step), s.policy,
        loss_fn=s.task.loss, strategy=s.strategy, eps=s.cfg.clip.eps, halt=halt, skip=s.skip,
    )
    s.scheduler.step()
    return m


class _RankBatches(torch.utils.data.Dataset):
    """For torch's DataLoader: a batch of sample indices (one micro-batch) -> the batch, read in a worker."""

    def __init__(self, samples: Samples):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, Batch]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return idx, self.samples.batch(idx)


class _RankSampler(torch.utils.data.Sampler):
    """This rank's micro-batches of steps start .. end - 1, in order: the same indices `micro_batches` reads."""

    def __init__(self, s: Setup, start: int, end: int):
        self.s, self.start, self.end = s, start, end

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.end):
            for p in rank_parts(self.s, step):
                yield p.tolist()

    def __len__(self) -> int:
        return (self.end - self.start) * self.s.cfg.train.grad_accum_steps


def _as_is(batch: Any) -> Any:
    return batch


def step_batches(s: Setup, start: int) -> Iterator[list[Batch]]:
    """The micro-batches of steps start, start + 1, ... on the device: read by data.num_workers worker processes
    ahead of the step (torch's DataLoader; pinned memory on CUDA), or read when asked (0 workers). Either way the
    same samples: the step decides them, so a resumed run reads on where it stopped."""
    workers = s.cfg.data.num_workers
    if not workers:
        for step in range(start, s.max_steps):
            yield micro_batches(s, step)
        return
    loader = torch.utils.data.DataLoader(
        _RankBatches(s.dataset), batch_sampler=_RankSampler(s, start, s.max_steps), num_workers=workers,
        collate_fn=_as_is, pin_memory=s.device.type == "cuda", prefetch_factor=2)
    accum = s.cfg.train.grad_accum_steps
    it = iter(loader)
    try:
        for _ in range(start, s.max_steps):
            out = []
            for _ in range(accum):
                idx, batch = next(it)
                s.task.check_batch(batch, idx, s.dataset)
                out.append(s.strategy.cast_inputs(_to(batch, s.device)))
            yield out
    finally:
        del it  # stops the workers


def _to(batch: Batch, device: torch.device) -> Batch:
    """A batch the DataLoader already pinned, on the device."""
    return map_tensors(batch, lambda t: t.to(device, non_blocking=True))
