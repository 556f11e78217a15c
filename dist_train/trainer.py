"""The training loop: builds the pieces from a Config, runs `train_step`, logs."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from dist_train import checkpoint as ckpt
from dist_train import config as C
from dist_train import strategies
from dist_train.amp import pick_device
from dist_train.clip import ClipPolicy, SpikeSkip, build_policy, build_spike_skip
from dist_train.data import GlobalBatches, TokenDataset, build_dataset, split_for_rank
from dist_train.distributed import DistState
from dist_train.errors import ConfigError, Stopped, TrainingError, UsageError, io_error, signal_name, writing
from dist_train.metrics import JsonlSink, Sink, Window, layer_norms, make_record, spike_record
from dist_train.model import build_model, check_model_output
from dist_train.progress import ProgressReporter, count, hms, num
from dist_train.rundir import RunDir
from dist_train.signals import StopSignal
from dist_train.step import StepMetrics, train_step
from dist_train.strategies.base import Strategy
from dist_train.strategies.ddp import check_replicas

log = logging.getLogger("dist_train")


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
    plan: strategies.Plan
    strategy: Strategy
    skip: Optional[SpikeSkip] = None
    #: The names of the parameters the step trains, in its order (per-layer norms, spike forensics).
    param_names: tuple[str, ...] = ()
    #: Global batches left out (data.skip_steps and its file), 1-based, sorted.
    skipped_batches: tuple[int, ...] = ()


def build(
    cfg: C.Config,
    dist: Optional[DistState] = None,
    device: Optional[torch.device] = None,
    plan: Optional[strategies.Plan] = None,
    sync_grads: bool = True,
) -> Setup:
    """Build model, data, optimizer, policy and the strategy for this rank.

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
    dataset = build_dataset(cfg.data, cfg.model.block_size, t.seed)
    batches = GlobalBatches(len(dataset), t.global_batch_size, t.seed)
    torch.manual_seed(t.seed)  # the same initial weights on every rank and every world size
    model = build_model(cfg.model, dataset.vocab_size).to(device)
    if cfg.model.factory is not None:
        check_model_output(model, cfg.model, dataset.vocab_size, device)
    strategy = strategies.create(plan, dist, device, cfg)
    o = cfg.optim
    # Fused AdamW (CPU and CUDA): one kernel per parameter group that also takes the clip coefficient, the
    # fp16 unscale and the skip decision as device tensors, so the step needs no host read (dist_train.step).
    # DeepSpeed's engine drives the optimizer itself and keeps torch's default implementation.
    fused = strategy.fused_optimizer
    model, optimizer = strategy.setup(
        model, lambda params: torch.optim.AdamW(params, lr=o.lr, betas=(o.beta1, o.beta2),
                                                weight_decay=o.weight_decay, fused=fused or None)
    )
    torch.manual_seed(t.seed + dist.rank)  # per-rank randomness (dropout) from here on
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o, t.max_steps))
    skip = build_spike_skip(cfg.clip)
    names = tuple(n for n, p in strategy.unwrap(model).named_parameters() if p.requires_grad)
    return Setup(
        cfg=cfg,
        dist=dist,
        device=device,
        dataset=dataset,
        batches=batches,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        policy=build_policy(cfg.clip).to(device),
        plan=plan,
        strategy=strategy,
        skip=skip.to(device) if skip is not None else None,
        param_names=names,
        skipped_batches=tuple(C.skipped_batches(cfg.data)),
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


def micro_batches(s: Setup, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's micro-batches of optimizer step `step` (0-based), on the device."""
    idx = s.batches.indices(batch_of(s, step))
    parts = split_for_rank(idx, s.dist.rank, s.dist.world_size, s.cfg.train.grad_accum_steps)
    pin = s.device.type == "cuda"
    out = []
    for p in parts:
        # One contiguous tensor per micro-batch, in page-locked memory on CUDA: the copy runs asynchronously
        # (a non-contiguous or pageable source would be staged through pageable memory first), and inputs
        # and targets are cut from it on the device.
        w = s.dataset.windows(p)
        if pin:
            w = w.pin_memory()
        w = w.to(s.device, non_blocking=True)
        out.append((w[:, :-1], w[:, 1:]))
    return out


def optimizer_step(s: Setup, step: int, halt: Optional[torch.Tensor] = None) -> StepMetrics:
    """Optimizer step `step` (0-based) of a built setup: the training step, then the LR schedule."""
    m = train_step(
        s.model, s.optimizer, micro_batches(s, step), s.policy, strategy=s.strategy, eps=s.cfg.clip.eps, halt=halt,
        skip=s.skip,
    )
    s.scheduler.step()
    return m


class SkipCounter:
    """Skipped (non-finite) optimizer steps, counted on the device: the total and the number in a row; and
    the spikes: steps skipped as spikes (clip.skip_sigma), and spike events (those, and steps an adaptive
    policy clipped after its warm-up), which get their own row and a line in spikes.jsonl.

    The host learns them without stalling the device. After each step a copy of the counts goes to one of
    two host buffers (page-locked on CUDA, non-blocking); the next step, once its own work is queued, reads
    the previous step's buffer (on CUDA after that copy's event, i.e. once the previous step has finished,
    while the device works on the current one). Logged steps read the counts exactly (`exact`).

    `halt` is a device flag, True once `limit` steps in a row were skipped: passed to the next step, it
    makes that step update nothing, so learning of the limit one step late changes nothing.
    """

    def __init__(self, device: torch.device, total: int, consecutive: int, limit: int, spikes: int = 0,
                 events: int = 0):
        self.device = device
        self.limit = limit
        start = [total, consecutive, spikes, events]
        self.counts = torch.tensor(start, dtype=torch.int64, device=device)
        self.halt = self.counts[1] >= limit
        cuda = device.type == "cuda"
        self._host = [torch.tensor(start, dtype=torch.int64).pin_memory() if cuda else
                      torch.tensor(start, dtype=torch.int64) for _ in range(2)]
        self._events: list[Optional[Any]] = [None, None]
        self._last = 0  # the buffer of the latest step
        self._steps = 0

    def add(self, m: StepMetrics) -> None:
        """Count one step; no host read."""
        s = m.skipped.to(torch.int64)
        spike = m.spike.to(torch.int64) if m.spike is not None else torch.zeros_like(s)
        event = spike | (m.spike_clipped.to(torch.int64) if m.spike_clipped is not None else torch.zeros_like(s))
        c = self.counts
        self.counts = torch.stack([c[0] + s, (c[1] + s) * s, c[2] + spike, c[3] + event])
        self.halt = self.counts[1] >= self.limit
        self._last ^= 1
        self._host[self._last].copy_(self.counts, non_blocking=True)
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
            self._events[self._last] = event
        self._steps += 1

    def previous(self) -> Optional[tuple[int, int, int, int]]:
        """(total, in a row, spikes skipped, spike events) as of the step before the latest one; None before
        the second step counted."""
        if self._steps < 2:
            return None
        k = self._last ^ 1
        if self._events[k] is not None:
            self._events[k].synchronize()  # that step's copy has landed; the latest step may still run
        # A host buffer read through numpy: no device read (on a CPU, none that a sync counter would see).
        total, consecutive, spikes, events = self._host[k].numpy().tolist()
        return total, consecutive, spikes, events

    def exact(self) -> tuple[int, int, int, int]:
        """(total, in a row, spikes skipped, spike events) as of the latest step: a host sync (logged steps,
        checkpoints)."""
        total, consecutive, spikes, events = self.counts.tolist()
        return total, consecutive, spikes, events


@dataclass
class Progress:
    """Where a run stands: what a checkpoint restores besides the model and the optimizer."""

    step: int = 0  # optimizer steps done
    skipped_total: int = 0
    consecutive: int = 0  # non-finite steps in a row, up to this step
    spike_skipped: int = 0  # steps skipped as spikes (clip.skip_sigma)
    spike_events: int = 0  # steps in spikes.jsonl
    wandb_id: Optional[str] = None
    origin: Optional[str] = None  # the checkpoint a train.resume=PATH started this run's line from


def trainer_state(s: Setup, p: Progress) -> dict[str, Any]:
    """The trainer's part of a checkpoint (every rank calls this: the RNG states are gathered)."""
    scaler = s.strategy.scaler
    return {
        "format": ckpt.FORMAT,
        "step": p.step,
        "skipped_steps": p.skipped_total,
        "consecutive_nonfinite": p.consecutive,
        "spike_skipped_steps": p.spike_skipped,
        "spike_events": p.spike_events,
        "spike_skip": s.skip.state_dict() if s.skip is not None else None,
        "wandb_id": p.wandb_id,
        "strategy": s.plan.strategy,
        "world_size": s.dist.world_size,
        "scheduler": s.scheduler.state_dict(),
        "clip_policy": {"name": s.policy.name, "state": s.policy.state_dict()},
        "scaler": scaler.state_dict() if scaler is not None else None,
        # Batches are addressed by step: the step is the data position. These say which data it indexes.
        "data": {"num_samples": len(s.dataset), "global_batch_size": s.cfg.train.global_batch_size,
                 "seed": s.cfg.train.seed, "skipped_batches": list(s.skipped_batches),
                 "next_batch": batch_of(s, p.step)},
        "rng": s.dist.gather(ckpt.rng_state()),  # one per rank
        "vocab": s.dataset.itos,
        "config": C.to_dict(s.cfg),
    }


def save_checkpoint(s: Setup, run_dir: Path, p: Progress) -> Path:
    """Every rank calls this. The strategy writes into a temporary folder (rank 0 alone, or every rank its
    shards); then rank 0 completes it: manifest, rename, `latest`, rotation (see dist_train.checkpoint)."""
    root = run_dir / ckpt.DIR
    name = ckpt.name_of(p.step)
    with writing(root / name):
        tmp = s.dist.share(s.dist.on_main(lambda: ckpt.begin(root, p.step)))
    error: Optional[BaseException] = None
    files: dict[str, Any] = {}
    try:
        s.strategy.save_checkpoint(s.model, s.optimizer, tmp, trainer_state(s, p), s.dist.is_main)
    except Exception as e:  # every rank learns of it below, rather than waiting for this one
        error = e
    if not s.dist.any(error is not None):  # every rank's files are written
        try:
            files = ckpt.hash_files(tmp, s.dist.rank, s.dist.world_size)
        except OSError as e:
            error = e
    failed = s.dist.any(error is not None)
    hashed = s.dist.gather(files) if not failed else []
    try:
        if failed:
            if error is None:
                err = TrainingError(f"writing checkpoint '{root / name}' failed on another rank (its error says why)")
                err.scope = "main"
                raise err
            raise error
        extra = {"strategy": s.plan.strategy, "kind": s.strategy.checkpoint_kind, "world_size": s.dist.world_size,
                 "resumed_from": p.origin, "config": C.to_dict(s.cfg)}
        merged = {k: v for part in hashed for k, v in part.items()}
        with writing(root / name):
            final = s.dist.on_main(lambda: ckpt.commit(root, tmp, p.step, s.cfg.train.keep_checkpoints, extra, merged))
    except BaseException as e:
        if s.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # the previous checkpoints stay as they were
        cause = e.__cause__ if isinstance(e, TrainingError) else e
        if isinstance(cause, OSError):  # name the checkpoint, not the temporary file inside it
            raise io_error(root / name, cause) from e
        raise
    return s.dist.share(final)


def load_checkpoint(s: Setup, folder: Path) -> Progress:
    """Every rank calls this: restore everything `save_checkpoint` saved from `folder`."""
    manifest = ckpt.read_manifest(folder)
    if manifest.get("format") != ckpt.FORMAT:
        raise ConfigError(f"train.resume: the checkpoint '{folder}' has format {manifest.get('format')} and this "
                          f"version of dist_train reads format {ckpt.FORMAT} (its steps address other samples); "
                          "finish that run with the version that wrote it, or start a new run")
    kind, world = manifest.get("kind"), manifest.get("world_size")
    if kind != s.strategy.checkpoint_kind:
        raise ConfigError(f"train.resume: the checkpoint '{folder}' was written by dist.strategy="
                          f"{manifest.get('strategy')} ({kind} format), which this run's strategy {s.plan.strategy} "
                          f"cannot read; resume with dist.strategy={manifest.get('strategy')}")
    if kind == "deepspeed" and world != s.dist.world_size:
        raise ConfigError(f"train.resume: the DeepSpeed checkpoint '{folder}' was written by {world} processes and "
                          f"this run has {s.dist.world_size}; DeepSpeed's checkpoints resume on the same world size")
    changed = ckpt.changed_keys(manifest.get("config", {}), C.to_dict(s.cfg))
    if changed:
        raise ConfigError(f"train.resume: config key '{changed[0]}' differs from the checkpoint's ("
                          f"{len(changed)} key(s) that decide the trajectory: {', '.join(changed[:4])}); set them "
                          f"as in {folder.parent.parent / 'config.yaml'}, or start a new run")
    # The data set is checked before the model is loaded: another vocabulary is another model shape too.
    state = s.strategy.load_checkpoint(s.model, s.optimizer, folder, functools.partial(check_data, s))
    data = state.get("data", {})
    done = data.get("next_batch", state["step"])  # batches 1..done were trained on or left out
    before = {b for b in data.get("skipped_batches", []) if b <= done}
    now = {b for b in s.skipped_batches if b <= done}
    if before != now:
        added, dropped = sorted(now - before), sorted(before - now)
        change = (f"leaves out batch(es) {', '.join(map(str, added))}" if added else
                  f"no longer leaves out batch(es) {', '.join(map(str, dropped))}")
        raise ConfigError(f"train.resume: data.skip_steps {change}, but the checkpoint at step {state['step']} has "
                          f"already passed batch {done}; leave out only batches after {done} (or resume from an "
                          "earlier checkpoint)")
    s.scheduler.load_state_dict(state["scheduler"])
    apply_optim_config(s)
    policy = state["clip_policy"]
    if policy["name"] == s.policy.name:
        _load_or_start_afresh(s.policy.load_state_dict, policy["state"], f"clip policy {s.policy.name}")
    else:
        log.warning("the checkpoint's clip policy is %s and this run's %s: %s starts afresh",
                    policy["name"], s.policy.name, s.policy.name)
    if s.skip is not None:
        if state.get("spike_skip") is not None:
            _load_or_start_afresh(s.skip.load_state_dict, state["spike_skip"], "spike window")
        else:
            log.warning("the checkpoint was written without clip.skip_sigma: its spike window starts empty")
    scaler = s.strategy.scaler
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    rng = state["rng"]
    if len(rng) == s.dist.world_size:
        ckpt.set_rng_state(rng[s.dist.rank])
    elif s.cfg.model.dropout > 0:
        log.warning("the checkpoint was written by %d processes and this run has %d: dropout's random streams "
                    "start afresh, so the trajectory is not the one an uninterrupted run would take",
                    len(rng), s.dist.world_size)
    return Progress(step=state["step"], skipped_total=state["skipped_steps"],
                    consecutive=state["consecutive_nonfinite"], wandb_id=state.get("wandb_id"),
                    spike_skipped=state.get("spike_skipped_steps", 0), spike_events=state.get("spike_events", 0))


def check_data(s: Setup, state: dict[str, Any]) -> None:
    """Refuse a checkpoint whose steps address another data set (its size or vocabulary differ): a text
    file changed in place, say."""
    then, vocab = state.get("data", {}).get("num_samples"), state.get("vocab")
    if then == len(s.dataset) and vocab == s.dataset.itos:
        return
    d = s.cfg.data
    name = (f"data.text_file '{d.text_file}'" if d.text_file else f"data.token_file '{d.token_file}'" if d.token_file
            else "the data set")
    now = s.dataset.itos
    how = [f"{len(s.dataset)} samples now, {then} then"] if then != len(s.dataset) else []
    if vocab != now:
        if now is not None and vocab is not None and len(now) != len(vocab):
            how.append(f"a vocabulary of {len(now)} symbols now, {len(vocab)} then")
        else:
            how.append("another vocabulary")
    raise ConfigError(f"train.resume: the data set differs from the checkpoint's: {name} has changed "
                      f"({'; '.join(how)}), so the steps would address other samples; resume with the same data, "
                      "or start a new run")


def _load_or_start_afresh(load: Callable[[dict[str, Any]], None], state: dict[str, Any], what: str) -> None:
    """Restore a clip policy's (or the spike window's) state; one the settings changed (another window size)
    cannot be restored: it starts afresh, with a warning, as a changed clip.policy does."""
    try:
        load(state)
    except ValueError as e:
        log.warning("the checkpoint's %s state does not fit this run's settings (%s): it starts afresh", what, e)


def check_checkpoint(s: Setup, folder: Path) -> Optional[str]:
    """Why `folder` cannot be resumed from (None: intact). Every rank checks its share of the files (a
    collective), so a large checkpoint is read once in all, in parallel, with no rank left waiting."""
    mine = ckpt.problem(folder, s.dist.rank, s.dist.world_size)
    return next((p for p in s.dist.gather(mine) if p is not None), None)


def apply_optim_config(s: Setup) -> None:
    """After a resume, the optim.* values of this run's config (loading the optimizer and the schedule
    restored the saved ones): the peak lr, betas and weight decay, and the lr of the current step under
    this run's schedule. Unchanged values give back the very same numbers."""
    o = s.cfg.optim
    s.scheduler.base_lrs = [o.lr for _ in s.optimizer.param_groups]
    for group, factor in zip(s.optimizer.param_groups, s.scheduler.lr_lambdas):
        group["initial_lr"] = o.lr
        group["lr"] = o.lr * factor(s.scheduler.last_epoch)
        group["betas"] = (o.beta1, o.beta2)
        group["weight_decay"] = o.weight_decay


def find_resume(s: Setup, run_dir: RunDir) -> tuple[Optional[Path], Optional[str]]:
    """(the checkpoint train.resume names, the run's origin); (None, None): start at step 0. Every rank
    takes part (the files are checked together); rank 0 warns about the checkpoints passed over."""
    s.dist.on_main(lambda: ckpt.remove_leftovers(run_dir.path / ckpt.DIR))
    error: Optional[UsageError] = None
    try:
        found = ckpt.resolve_resume(s.cfg.train.resume, run_dir.path, functools.partial(check_checkpoint, s),
                                    warn=s.dist.is_main)
    except UsageError as e:
        error = e
    # Every rank reads the run directory above and rank 0 writes it next (config.yaml, metrics.jsonl), so no
    # rank goes on before every rank has read it: a late rank would find the new run's files there and
    # refuse it as "another run". Ranks that read the same files decide alike; should they not, each says why.
    if not s.dist.any(error is not None):
        return found
    everywhere = not s.dist.any(error is None)
    if error is None:
        error = UsageError("train.resume: another rank could not resolve the checkpoint (its error says why)")
        error.scope = "main"
    elif everywhere:
        error.scope = "main"  # every rank found it alike; rank 0 says it
    raise error


@dataclass
class Outputs:
    """Rank 0's open run: the locked directory and the sinks writing into it."""

    run_dir: RunDir
    jsonl: JsonlSink
    sinks: list[Sink]
    wandb: Optional[Any] = None  # the WandbSink, when W&B is not disabled
    spikes: list[Sink] = dataclasses.field(default_factory=list)  # spikes.jsonl
    layers: list[Sink] = dataclasses.field(default_factory=list)  # per_layer.jsonl and W&B

    def metric_sinks(self) -> list[Sink]:
        """The sinks of the metrics rows (`sinks` also holds the other files, so that all are closed)."""
        return [k for k in self.sinks if k not in self.spikes and k not in self.layers or k is self.wandb]


#: One line per spike (skipped, or clipped by zscore): the forensics of spike skipping.
SPIKES = "spikes.jsonl"
#: One line per logging.per_layer_every step: each module's raw gradient norm.
PER_LAYER = "per_layer.jsonl"


def open_outputs(cfg: C.Config, s: Setup, run_dir: RunDir, resumed: Optional[Progress]) -> Outputs:
    """Lock the run directory, write config (and vocabulary), open metrics.jsonl and W&B.

    All or nothing: if any of it fails, what was written is removed again. A resumed run (`resumed`)
    keeps the directory's files: metrics.jsonl is cut back to the checkpoint's step and appended to,
    and W&B continues the checkpoint's run.
    """
    resume = cfg.train.resume != "none"
    run_dir.open(cfg.run.overwrite, resume=resume)
    try:
        run_dir.write_text("config.yaml", C.to_yaml(cfg))
        if s.dataset.itos is not None:
            run_dir.write_text("vocab.json", json.dumps(s.dataset.itos, ensure_ascii=False) + "\n")
        if resume:
            step = resumed.step if resumed is not None else 0
            dropped = ckpt.drop_newer(run_dir.path / ckpt.DIR, step)
            if dropped:
                log.warning("resuming from step %d discards the later checkpoints %s", step, ", ".join(dropped))
        keep = resumed.step if resumed is not None else (0 if resume else None)

        def open_jsonl(name: str) -> JsonlSink:
            path = run_dir.path / name
            if not (resume and path.exists()):
                run_dir.wrote(name)
            return JsonlSink(path, keep_through=keep)

        jsonl = open_jsonl("metrics.jsonl")
        out = Outputs(run_dir, jsonl, [jsonl])
        out.spikes.append(open_jsonl(SPIKES))
        out.sinks.append(out.spikes[0])  # closed with the others
        if per_layer_every(s):
            out.layers.append(open_jsonl(PER_LAYER))
            out.sinks.append(out.layers[0])
        if cfg.logging.wandb.mode != C.WandbMode.disabled:
            from dist_train.wandb_sink import WandbSink

            if not (run_dir.path / "wandb").exists():
                run_dir.wrote("wandb")
            out.wandb = WandbSink(cfg.logging.wandb, run_dir.path, cfg.run.name or run_dir.path.resolve().name,
                                  C.to_dict(cfg), run_id=resumed.wandb_id if resumed is not None else None)
            out.sinks.append(out.wandb)
            if per_layer_every(s):
                out.layers.append(out.wandb)
        return out
    except BaseException:
        run_dir.finish(discard=True)
        raise


def startup_summary(s: Setup, out: Outputs, resumed: bool = False) -> list[str]:
    cfg, d = s.cfg, s.dist
    n_params = s.strategy.num_parameters(s.model)
    world = (f"{d.world_size} processes ({d.launcher}, backend {d.backend})" if d.distributed
             else "1 process (no launcher)" if d.launcher == "none" else f"1 process ({d.launcher})")
    precision = s.plan.precision.label
    lines = [
        f"dist-train: {cfg.train.max_steps} steps of {cfg.train.global_batch_size} samples on {s.device}, {world}, "
        f"precision {precision}, model {count(n_params)} parameters",
        f"dist-train: strategy {s.plan.strategy}: {s.strategy.describe()}",
        f"dist-train: run directory {out.run_dir.path}",
    ]
    if s.device.type == "cpu" and s.plan.precision != C.Precision.no:
        lines.append("dist-train: note: bf16 and fp16 on a CPU are often slower than fp32 (about 2x for the debug model)")
    if cfg.logging.per_layer_every and s.strategy.engine_steps:
        lines.append("dist-train: note: logging.per_layer_every logs nothing under DeepSpeed: its engine computes the "
                     "gradient norm inside its own step, over its partitions, and reports the total only")
    if cfg.clip.skip_on != "norm" and not cfg.clip.skip_sigma:
        lines.append(f"dist-train: note: clip.skip_on={cfg.clip.skip_on} does nothing without clip.skip_sigma > 0: "
                     "spike skipping is off")
    if cfg.data.skip_steps_file is not None and not C.skipped_batches(dataclasses.replace(cfg.data, skip_steps=[])):
        lines.append(f"dist-train: note: data.skip_steps_file '{cfg.data.skip_steps_file}' lists no batch: it leaves "
                     "nothing out")
    if out.wandb is None:
        lines.append("dist-train: W&B disabled")
    elif out.wandb.sync_dir is not None:
        sync = out.wandb.sync_dir
        if resumed:  # every part of the run: one offline folder per start, all of the same run id
            sync = sync.parent / f"offline-run-*-{out.wandb.run_id}"
        lines.append(f"dist-train: W&B offline; upload later with: wandb sync {sync}")
    else:
        lines.append(f"dist-train: W&B online: {out.wandb.url}")
    return lines


@dataclass
class Outcome:
    progress: Progress
    stopped_by: Optional[int] = None  # the signal that stopped the run early


def run(s: Setup, sinks: list[Sink], progress: ProgressReporter, stop: Optional[StopSignal] = None,
        start: Optional[Progress] = None, checkpoint: Optional[Callable[[Progress], None]] = None,
        spike_sinks: Sequence[Sink] = (), layer_sinks: Sequence[Sink] = ()) -> Outcome:
    """The loop, from `start` (a resumed run's progress) to train.max_steps. Stops early, after a complete
    optimizer step, when a stop signal was received. `checkpoint` is called on every rank after every
    train.checkpoint_every steps (the trainer writes the last one itself).

    A step that is not logged reads nothing back from the device (checkpoint steps and
    dist.check_sync_every steps read too). Logged steps are those of logging.every and
    logging.per_layer_every, the last one, the one a stop signal ends on, every skipped step and every
    spike (skipped, or clipped by zscore): the host learns of those one step late
    (`SkipCounter`) and then logs that step's own row, in order, and its line in spikes.jsonl
    (`spike_sinks`). The run stops when clip.max_consecutive_nonfinite
    steps in a row were skipped: at that step when it is logged anyway, otherwise one step later, and that
    later step updates nothing (it is halted on the device). Under an engine that decides skips on the
    host itself (DeepSpeed), the counts are read every step, and the run stops at the limit.
    """
    cfg = s.cfg
    t = cfg.train
    window = Window(s.device)
    vote = s.dist.stop_vote()
    p = dataclasses.replace(start) if start is not None else Progress()
    out = Outcome(progress=p)
    skips = SkipCounter(s.device, p.skipped_total, p.consecutive, cfg.clip.max_consecutive_nonfinite,
                        p.spike_skipped, p.spike_events)
    known = (p.skipped_total, p.spike_events)  # the skips and spike events the host has reported
    # The engine reads its skip on the host anyway: nothing to gain from learning it a step late.
    immediate = s.strategy.engine_steps
    every_layer = per_layer_every(s)
    # (step, metrics, lr, logged, the time its work was queued by) of the last step
    prev: Optional[tuple[int, StepMetrics, float, bool, float]] = None

    def log_row(n: int, m: StepMetrics, lr: float, counts: tuple[int, int, int, int], advance: bool,
                t_end: Optional[float] = None) -> None:
        """Step n's row; the logging window ends at t_end (a deferred row: the end of step n, not now)."""
        total, consecutive, spikes, _ = counts
        record = None
        loss = s.dist.mean(m.loss)  # collective: every rank takes part
        if s.dist.is_main:
            record = make_record(step=n, loss=loss, m=m, window=window, lr=lr, skipped_total=total,
                                 tokens_per_sample=cfg.model.block_size, t_end=t_end,
                                 spike_skipped_total=spikes if s.skip is not None else None)
            for sink in sinks:
                sink.log(record)
            spike = bool(spike_sinks) and is_spike(m)
            per_layer = bool(every_layer) and n % every_layer == 0
            # Each module's norm (one read of the per-tensor norms), only on the rows that use it.
            layers = layer_norms(s.param_names, m.param_norms) if m.param_norms is not None and (
                spike or per_layer) else None
            if spike:
                batch = batch_of(s, n - 1)
                line = spike_record(step=n, batch=batch + 1, record=record, m=m, layers=layers,
                                    top_k=cfg.logging.spike_top_k, samples=s.batches.indices(batch).tolist())
                for sink in spike_sinks:
                    sink.log(line)
            if layers is not None and per_layer:
                row = {"step": n, **{f"grad_norm_layer/{k}": v for k, v in layers.items()}}
                for sink in layer_sinks:
                    sink.log(row)
        window.reset(t_end)
        if record is not None and record["optim/step_skipped"]:
            progress.message(f"dist-train: step {n}: non-finite gradient norm, optimizer step skipped "
                             f"({consecutive} in a row)")
        elif record is not None and record.get("optim/spike_skipped"):
            progress.message(f"dist-train: step {n}: spike ({spike_cause(record)}), optimizer step skipped; see "
                             "spikes.jsonl")
        elif record is not None and record.get("clip/spike_clipped"):
            progress.message(f"dist-train: step {n}: spike (grad norm {num(record['grad_norm/raw'])} > zscore "
                             f"threshold {num(record['grad_norm/threshold'])}), clipped; see spikes.jsonl")
        progress.step(record, advance=advance)

    def check_limit(n: int, consecutive: int) -> None:
        if consecutive >= cfg.clip.max_consecutive_nonfinite:
            hint = ("lower optim.lr (and clip.max_norm, if the norms grew before this), or check the data around "
                    "these steps")
            if s.plan.precision == C.Precision.fp16:
                hint += "; fp16 overflows: train.precision=bf16 has fp32's range"
            raise TrainingError(
                f"training stopped at step {n}: {consecutive} consecutive optimizer steps had a non-finite "
                f"gradient norm (clip.max_consecutive_nonfinite={cfg.clip.max_consecutive_nonfinite}); {hint}"
            )

    def news(counts: tuple[int, int, int, int]) -> bool:
        """Whether `counts` hold a skip or a spike the host has not reported yet (then remembered)."""
        nonlocal known
        now = (counts[0], counts[3])
        fresh = now != known
        known = now
        return fresh

    s.model.train()
    for step in range(p.step, t.max_steps):
        lr = s.optimizer.param_groups[0]["lr"]
        m = optimizer_step(s, step, halt=skips.halt)
        t_step = time.perf_counter()
        skips.add(m)
        n = p.step = step + 1
        late = None if immediate else skips.previous()  # the counts after step n - 1, not waiting for step n
        if late is not None and prev is not None and not prev[3]:
            if news(late):  # step n - 1 was skipped or a spike: its own row, before step n's
                log_row(prev[0], prev[1], prev[2], late, advance=False, t_end=prev[4])
            check_limit(prev[0], late[1])
        window.add(m, t.global_batch_size)
        # Every rank learns the same answer at the same step, so the last step is logged by all.
        stop_now = vote.poll(stop is not None and stop.requested) and n < t.max_steps
        logged = (n % cfg.logging.every == 0 or n == t.max_steps or stop_now
                  or bool(every_layer and n % every_layer == 0))
        counts = None
        if immediate and not logged:
            counts = skips.exact()
            logged = (counts[0], counts[3]) != known  # a skipped step or a spike: its row now
        if logged:
            counts = skips.exact()
            news(counts)
            log_row(n, m, lr, counts, advance=True)
        else:
            progress.step(None)
        prev = (n, m, lr, logged, t_step)
        if cfg.dist.check_sync_every and n % cfg.dist.check_sync_every == 0:
            check_replicas(s.strategy.full_parameters(s.model), s.dist, n)
        if logged:
            check_limit(n, counts[1])
        if stop_now:
            out.stopped_by = stop.signum if stop is not None and stop.signum is not None else signal.SIGTERM
            break
        if checkpoint is not None and t.checkpoint_every and n % t.checkpoint_every == 0 and n < t.max_steps:
            counts = skips.exact()
            p.skipped_total, p.consecutive, p.spike_skipped, p.spike_events = counts
            if news(counts):  # step n was skipped or a spike: its row goes out before its checkpoint
                log_row(n, m, lr, counts, advance=False)
                prev = (n, m, lr, True, t_step)
                check_limit(n, p.consecutive)
            checkpoint(p)
    vote.close()
    p.skipped_total, p.consecutive, p.spike_skipped, p.spike_events = skips.exact()
    return out


def spike_cause(record: dict[str, Any]) -> str:
    """What exceeded its limit in a skipped spike's row, e.g. 'grad norm 4.100 > 2.400'."""
    causes = []
    for key, what, value in (("clip/spike_limit", "grad norm", "grad_norm/raw"),
                             ("clip/spike_loss_limit", "loss", "train/loss")):
        limit, v = record.get(key), record.get(value)
        if limit is not None and v is not None and v > limit:
            causes.append(f"{what} {num(v)} > {num(limit)}")
    return ", ".join(causes) or "over its limit"


def is_spike(m: StepMetrics) -> bool:
    """Whether step `m` was skipped as a spike or clipped as one by zscore (a host read)."""
    return bool((m.spike is not None and m.spike) or (m.spike_clipped is not None and m.spike_clipped))


def _finish(steps: list[tuple[str, Callable[[], None]]], primary: Optional[BaseException]) -> None:
    """Run every teardown step. With an error already on its way out, a failing step is
    only logged for --debug (most often it failed for the same reason, a full disk, and
    must not bury the real error); otherwise the first failure is raised."""
    first: Optional[BaseException] = None
    for what, fn in steps:
        try:
            fn()
        except Exception as e:
            if primary is None and first is None:
                first = e
            else:
                log.debug("%s failed too: %s", what, e)
    if first is not None:
        raise first


def train(
    cfg: C.Config,
    dist: Optional[DistState] = None,
    device: Optional[torch.device] = None,
    stop: Optional[StopSignal] = None,
) -> Path:
    """Check the run directory, build everything, resume if asked, then open it, train, log, plot,
    checkpoint.

    Rank 0 alone writes the run directory. A run that fails or is stopped before
    its first logged step leaves nothing behind; after it, everything logged stays.
    A stopped run writes a checkpoint first (train.checkpoint), and `Stopped` says where it is.
    """
    dist = dist or DistState()
    run_dir = RunDir(cfg.run.out_dir)
    resume = cfg.train.resume != "none"
    dist.on_main(lambda: run_dir.check(cfg.run.overwrite, resume))  # seconds before the setup, not after it
    s = build(cfg, dist, device)
    folder, origin = find_resume(s, run_dir) if resume else (None, None)
    resumed = load_checkpoint(s, folder) if folder is not None else None
    if resumed is not None:
        resumed.origin = origin
        if folder.resolve().parent != (run_dir.path / ckpt.DIR).resolve():
            resumed.wandb_id = None  # started from another run's checkpoint: a W&B run of its own
    if resumed is not None and resumed.step > cfg.train.max_steps:
        raise ConfigError(f"train.resume: the checkpoint '{folder}' is at step {resumed.step}, beyond train.max_steps="
                          f"{cfg.train.max_steps}; raise train.max_steps (or resume from an earlier checkpoint)")
    if resumed is not None and resumed.step == cfg.train.max_steps:
        # A finished run (a requeued job that had already completed, say): nothing to do, nothing touched.
        if dist.is_main:
            log.info("the checkpoint %s is at train.max_steps=%d: this run is complete, nothing left to train "
                     "(raise train.max_steps to train further)", folder, cfg.train.max_steps)
        return run_dir.path
    out = dist.on_main(lambda: open_outputs(cfg, s, run_dir, resumed))
    start = resumed or Progress()
    if out is not None and out.wandb is not None:
        start.wandb_id = out.wandb.run_id
    progress = ProgressReporter(cfg.logging.progress, cfg.train.max_steps, enabled=dist.is_main, start=start.step)
    if out is not None:
        for line in startup_summary(s, out, resumed is not None):
            progress.message(line)
        if folder is not None:
            progress.message(f"dist-train: resumed from {folder} (step {start.step}); metrics.jsonl continues after it")
        elif resume:
            progress.message(f"dist-train: train.resume={cfg.train.resume}: no checkpoint yet, starting at step 0")
    t0 = time.monotonic()
    outcome: Optional[Outcome] = None
    primary: Optional[BaseException] = None
    saved: Optional[Path] = None

    def checkpoint(p: Progress) -> None:
        nonlocal saved
        if out is not None and not (run_dir.path / ckpt.DIR).exists():
            run_dir.wrote(ckpt.DIR)
        saved = save_checkpoint(s, run_dir.path, p)

    try:
        outcome = run(s, out.metric_sinks() if out is not None else [], progress, stop, start,
                      checkpoint if cfg.train.checkpoint else None,
                      spike_sinks=out.spikes if out is not None else (), layer_sinks=out.layers if out is not None else ())
        if cfg.train.checkpoint:
            checkpoint(outcome.progress)  # the end, or where a stop signal left it
    except BaseException as e:
        primary = e
        raise
    finally:
        progress.close()
        if out is not None:
            code = 0 if primary is None else getattr(primary, "exit_code", 1)
            if primary is None and outcome is not None and outcome.stopped_by is not None:
                code = 128 + outcome.stopped_by
            logged = out.jsonl.rows > 0 or saved is not None  # a checkpoint is kept even before a logged row
            steps = [(f"closing {type(k).__name__}", functools.partial(k.close, code)) for k in out.sinks]
            if logged:
                from dist_train.plot import plot_layers, plot_run

                steps.append(("drawing the plot", lambda: plot_run(run_dir.path)))
                steps.append(("drawing the per-layer plot", lambda: plot_layers(run_dir.path)))
            steps.append(("releasing the run directory", lambda: run_dir.finish(discard=code != 0 and not logged)))
            _finish(steps, primary)
    if outcome.stopped_by is not None:  # the step it stopped after is always logged
        n = outcome.progress.step
        where = (f"checkpoint {saved}; continue with train.resume=auto" if saved is not None
                 else "no checkpoint (train.checkpoint=false)")
        raise Stopped(f"{signal_name(outcome.stopped_by)} received; stopped after step {n} of "
                      f"{cfg.train.max_steps} ({hms(time.monotonic() - t0)} elapsed); {where}; metrics.jsonl and the "
                      f"plot in {run_dir.path} hold every logged step", outcome.stopped_by, checkpoint=saved)
    return run_dir.path
