"""Where a run stands, and checkpoints: what they hold besides the model and optimizer, writing them on every
rank, and resuming from one (the checks that refuse a checkpoint of another run, data set or world size)."""

from __future__ import annotations

import functools
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from dist_train import checkpoint as ckpt
from dist_train import config as C
from dist_train import optim
from dist_train.errors import ConfigError, TrainingError, UsageError, io_error, writing
from dist_train.rundir import RunDir
from dist_train.trainer.setup import Setup, batch_of

log = logging.getLogger("dist_train")


@dataclass
class RunState:
    """Where a run stands: what a checkpoint restores besides the model and the optimizer."""

    step: int = 0  # optimizer steps done
    skipped_total: int = 0
    consecutive: int = 0  # non-finite steps in a row, up to this step
    spike_skipped: int = 0  # steps skipped as spikes (clip.skip_sigma)
    spike_events: int = 0  # steps in spikes.jsonl
    wandb_id: Optional[str] = None
    origin: Optional[str] = None  # the checkpoint a train.resume=PATH started this run's line from


def trainer_state(s: Setup, p: RunState) -> dict[str, Any]:
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


def save_checkpoint(s: Setup, run_dir: Path, p: RunState) -> Path:
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


def load_checkpoint(s: Setup, folder: Path) -> RunState:
    """Every rank calls this: restore everything `save_checkpoint` saved from `folder`."""
    manifest = ckpt.read_manifest(folder)
    if manifest.get("format") != ckpt.FORMAT:
        raise ConfigError(f"train.resume: the checkpoint '{folder}' has format {manifest.get('format')} and this "
                          f"version of dist_train reads format {ckpt.FORMAT} (its steps address other samples); "
                          "finish that run with the version that wrote it, or start a new run")
    kind = manifest.get("kind")
    if kind != s.strategy.checkpoint_kind:
        raise ConfigError(f"train.resume: the checkpoint '{folder}' was written by dist.strategy="
                          f"{manifest.get('strategy')} ({kind} format), which this run's strategy {s.plan.strategy} "
                          f"cannot read; resume with dist.strategy={manifest.get('strategy')}")
    s.strategy.check_resume(folder, manifest)
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
    return RunState(step=state["step"], skipped_total=state["skipped_steps"],
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
            else f"data.file '{d.file}'" if d.file else f"data.factory '{d.factory}'" if d.factory else "the data set")
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
    restored the saved ones): the peak lr, the optimizer's own options, and the lr of the current step under
    this run's schedule. Unchanged values give back the very same numbers."""
    o = s.cfg.optim
    s.scheduler.base_lrs = [o.lr for _ in s.optimizer.param_groups]
    for group, factor in zip(s.optimizer.param_groups, s.scheduler.lr_lambdas):
        group["initial_lr"] = o.lr
        group["lr"] = o.lr * factor(s.scheduler.last_epoch)
    optim.apply_config(s.optimizer, o)


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


