"""Training a run: `train` checks the run directory, builds everything (`setup`), resumes if asked (`resume`),
opens the outputs (`outputs`), runs the loop (`loop`, which evaluates with `evaluate`) and tears down.

    setup     Setup, build: data, task, model, optimizer, clip policy, strategy; the batches of each step
    resume    RunState, checkpoints written on every rank, resuming from one
    outputs   rank 0's run directory, metrics files and W&B, and the startup summary
    loop      run: the optimizer steps, what is logged when, the stop vote, the skip limit
    rows      a logged step's row, spike line, per-layer norms and progress line
    skips     SkipCounter: skipped steps and spikes counted on the device, learnt a step late
    evaluate  evaluation over disjoint parts of the validation set, summed over ranks
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from dist_train import checkpoint as ckpt
from dist_train import config as C
from dist_train.distributed import DistState
from dist_train.errors import ConfigError, Stopped, signal_name
from dist_train.progress import ProgressReporter, hms
from dist_train.rundir import RunDir
from dist_train.signals import StopSignal
from dist_train.trainer.loop import Outcome, run
from dist_train.trainer.outputs import open_outputs, startup_summary
from dist_train.trainer.resume import RunState, find_resume, load_checkpoint, save_checkpoint
from dist_train.trainer.setup import Setup, batch_of, build, micro_batches, optimizer_step

__all__ = ["RunState", "Setup", "batch_of", "build", "micro_batches", "optimizer_step", "run", "train"]

log = logging.getLogger("dist_train")


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
    prepare: Optional[Callable[[Setup], None]] = None,
) -> Path:
    """Check the run directory, build everything, resume if asked, then open it, train, log, plot,
    checkpoint.

    `prepare` is called with the built Setup before anything is written (a study or a test wraps its data set
    there: benchmarks/stability.py plants bad batches so).

    Rank 0 alone writes the run directory. A run that fails or is stopped before
    its first logged step leaves nothing behind; after it, everything logged stays.
    A stopped run writes a checkpoint first (train.checkpoint), and `Stopped` says where it is.
    """
    dist = dist or DistState()
    run_dir = RunDir(cfg.run.out_dir)
    resume = cfg.train.resume != "none"
    dist.on_main(lambda: run_dir.check(cfg.run.overwrite, resume))  # seconds before the setup, not after it
    s = build(cfg, dist, device)
    if prepare is not None:
        prepare(s)
    folder, origin = find_resume(s, run_dir) if resume else (None, None)
    resumed = load_checkpoint(s, folder) if folder is not None else None
    if resumed is not None:
        resumed.origin = origin
        if folder.resolve().parent != (run_dir.path / ckpt.DIR).resolve():
            resumed.wandb_id = None  # started from another run's checkpoint: a W&B run of its own
    last = last_step_name(cfg, s)
    if resumed is not None and resumed.step > s.max_steps:
        raise ConfigError(f"train.resume: the checkpoint '{folder}' is at step {resumed.step}, beyond {last}; raise "
                          f"{last.split('=')[0]} (or resume from an earlier checkpoint)")
    if resumed is not None and resumed.step == s.max_steps:
        # A finished run (a requeued job that had already completed, say): nothing to do, nothing touched.
        if dist.is_main:
            log.info("the checkpoint %s is at %s: this run is complete, nothing left to train (raise %s to train "
                     "further)", folder, last, last.split("=")[0])
        return run_dir.path
    out = dist.on_main(lambda: open_outputs(cfg, s, run_dir, resumed))
    start = resumed or RunState()
    if out is not None and out.wandb is not None:
        start.wandb_id = out.wandb.run_id
    progress = ProgressReporter(cfg.logging.progress, s.max_steps, enabled=dist.is_main, start=start.step)
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

    def checkpoint(p: RunState) -> None:
        nonlocal saved
        if out is not None and not (run_dir.path / ckpt.DIR).exists():
            run_dir.wrote(ckpt.DIR)
        saved = save_checkpoint(s, run_dir.path, p)

    try:
        outcome = run(s, out.metric_sinks() if out is not None else [], progress, stop, start,
                      checkpoint if cfg.train.checkpoint else None,
                      spike_sinks=out.spikes if out is not None else (), layer_sinks=out.layers if out is not None else ())
        if cfg.train.checkpoint:
            checkpoint(outcome.state)  # the end, or where a stop signal left it
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
        n = outcome.state.step
        where = (f"checkpoint {saved}; continue with train.resume=auto" if saved is not None
                 else "no checkpoint (train.checkpoint=false)")
        raise Stopped(f"{signal_name(outcome.stopped_by)} received; stopped after step {n} of "
                      f"{s.max_steps} ({hms(time.monotonic() - t0)} elapsed); {where}; metrics.jsonl and the "
                      f"plot in {run_dir.path} hold every logged step", outcome.stopped_by, checkpoint=saved)
    return run_dir.path



def last_step_name(cfg: C.Config, s: Setup) -> str:
    """'train.max_steps=300', or 'train.epochs=10 (500 steps)', for messages."""
    t = cfg.train
    return f"train.max_steps={t.max_steps}" if t.max_steps is not None else f"train.epochs={t.epochs} ({s.max_steps} steps)"
