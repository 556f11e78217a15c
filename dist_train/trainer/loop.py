"""The training loop: optimizer steps from a run's state to its last step, logging, evaluating and checkpointing
on the way; it reads nothing back from the device on a step it does not log."""

from __future__ import annotations

import dataclasses
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from dist_train.errors import TrainingError
from dist_train import config as C
from dist_train.metrics import Sink, _num
from dist_train.progress import ProgressReporter, num
from dist_train.signals import StopSignal
from dist_train.step import StepMetrics
from dist_train.strategies.ddp import check_replicas
from dist_train.trainer.evaluate import evaluate
from dist_train.trainer.resume import RunState
from dist_train.trainer.rows import Rows
from dist_train.trainer.setup import Setup, optimizer_step, per_layer_every, step_batches
from dist_train.trainer.skips import SkipCounter


@dataclass
class Outcome:
    state: RunState
    stopped_by: Optional[int] = None  # the signal that stopped the run early


@dataclass
class _Done:
    """A step the loop has queued: what its row needs if the host learns a step late that it must be logged."""

    step: int
    m: StepMetrics
    lr: float
    logged: bool
    t_end: float  # the time its work was queued by


def eval_every(s: Setup) -> int:
    """Steps between evaluations (0: none): eval.every; unset, each epoch's end under train.epochs, else the
    last step; never without a validation set."""
    if s.val is None:
        return 0
    every = s.cfg.eval.every
    if every is None:
        return s.steps_per_epoch if s.cfg.train.epochs is not None else s.max_steps
    return every


def run(s: Setup, sinks: list[Sink], progress: ProgressReporter, stop: Optional[StopSignal] = None,
        start: Optional[RunState] = None, checkpoint: Optional[Callable[[RunState], None]] = None,
        spike_sinks: Sequence[Sink] = (), layer_sinks: Sequence[Sink] = ()) -> Outcome:
    """The loop, from `start` (a resumed run's state) to the last step (train.max_steps, or train.epochs'
    steps). Stops early, after a complete
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
    vote = s.dist.stop_vote()
    p = dataclasses.replace(start) if start is not None else RunState()
    out = Outcome(state=p)
    max_steps = s.max_steps
    every_eval = eval_every(s)
    epochs = EpochLoss(s) if t.epochs is not None else None
    skips = SkipCounter(s.device, p.skipped_total, p.consecutive, cfg.clip.max_consecutive_nonfinite,
                        p.spike_skipped, p.spike_events)
    known = (p.skipped_total, p.spike_events)  # the skips and spike events the host has reported
    # The engine reads its skip on the host anyway: nothing to gain from learning it a step late.
    immediate = s.strategy.engine_steps
    every_layer = per_layer_every(s)
    rows = Rows(s, sinks, progress, spike_sinks, layer_sinks, epochs=t.epochs is not None)
    prev: Optional[_Done] = None  # the last step

    def news(counts: tuple[int, int, int, int]) -> bool:
        """Whether `counts` hold a skip or a spike the host has not reported yet (then remembered)."""
        nonlocal known
        now = (counts[0], counts[3])
        fresh = now != known
        known = now
        return fresh

    s.model.train()
    data = step_batches(s, p.step)
    for step in range(p.step, max_steps):
        lr = s.optimizer.param_groups[0]["lr"]
        m = optimizer_step(s, step, halt=skips.halt, batches=next(data))
        t_step = time.perf_counter()
        skips.add(m)
        n = p.step = step + 1
        if epochs is not None:
            epochs.add(m)
        late = None if immediate else skips.previous()  # the counts after step n - 1, not waiting for step n
        if late is not None and prev is not None and not prev.logged:
            if news(late):  # step n - 1 was skipped or a spike: its own row, before step n's
                rows.write(prev.step, prev.m, prev.lr, late, advance=False, t_end=prev.t_end)
            check_limit(s, prev.step, late[1])
        rows.window.add(m, t.global_batch_size)
        # Every rank learns the same answer at the same step, so the last step is logged by all.
        stop_now = vote.poll(stop is not None and stop.requested) and n < max_steps
        evaluate_now = bool(every_eval) and (n % every_eval == 0 or n == max_steps)
        epoch_end = epochs is not None and n % s.steps_per_epoch == 0
        logged = (n % cfg.logging.every == 0 or n == max_steps or stop_now or evaluate_now or epoch_end
                  or bool(every_layer and n % every_layer == 0))
        counts = None
        if immediate and not logged:
            counts = skips.exact()
            logged = (counts[0], counts[3]) != known  # a skipped step or a spike: its row now
        if logged:
            counts = skips.exact()
            news(counts)
            extra = evaluate(s) if evaluate_now else {}
            if epoch_end:
                extra["train/epoch_loss"] = epochs.mean()  # collective: every rank takes part
            rows.write(n, m, lr, counts, advance=True, extra=extra)
            if epoch_end and s.dist.is_main:
                progress.message(epoch_line(n // s.steps_per_epoch, t.epochs, extra))
        else:
            progress.step(None)
        prev = _Done(n, m, lr, logged, t_step)
        if cfg.dist.check_sync_every and n % cfg.dist.check_sync_every == 0:
            check_replicas(s.strategy.full_parameters(s.model), s.dist, n)
        if logged:
            check_limit(s, n, counts[1])
        if stop_now:
            out.stopped_by = stop.signum if stop is not None and stop.signum is not None else signal.SIGTERM
            break
        if checkpoint is not None and t.checkpoint_every and n % t.checkpoint_every == 0 and n < max_steps:
            counts = skips.exact()
            p.skipped_total, p.consecutive, p.spike_skipped, p.spike_events = counts
            if news(counts):  # step n was skipped or a spike: its row goes out before its checkpoint
                rows.write(n, m, lr, counts, advance=False)
                prev = _Done(n, m, lr, True, t_step)
                check_limit(s, n, p.consecutive)
            checkpoint(p)
    vote.close()
    data.close()
    p.skipped_total, p.consecutive, p.spike_skipped, p.spike_events = skips.exact()
    return out


def check_limit(s: Setup, n: int, consecutive: int) -> None:
    """Stop the run when clip.max_consecutive_nonfinite steps in a row, up to step n, were skipped."""
    limit = s.cfg.clip.max_consecutive_nonfinite
    if consecutive >= limit:
        hint = "lower optim.lr (and clip.max_norm, if the norms grew before this), or check the data around these steps"
        if s.plan.precision == C.Precision.fp16:
            hint += "; fp16 overflows: train.precision=bf16 has fp32's range"
        raise TrainingError(f"training stopped at step {n}: {consecutive} consecutive optimizer steps had a non-finite "
                            f"gradient norm (clip.max_consecutive_nonfinite={limit}); {hint}")


class EpochLoss:
    """The mean training loss of an epoch's steps (the loss per epoch a plain loop prints), summed on the device."""

    def __init__(self, s: Setup):
        self.s = s
        self.reset()

    def reset(self) -> None:
        self.total = torch.zeros((), dtype=torch.float64, device=self.s.device)
        self.steps = 0

    def add(self, m: StepMetrics) -> None:
        self.total += m.loss.double()
        self.steps += 1

    def mean(self) -> Optional[float]:
        """Over ranks (a collective), then starts the next epoch."""
        value = self.s.dist.mean(self.total / max(self.steps, 1)).item()  # a logged step: its host read
        self.reset()
        return _num(value)


def epoch_line(epoch: int, epochs: int, row: dict[str, Any]) -> str:
    """'dist-train: epoch 3/10: train loss 1.234, eval/loss 1.301, eval/accuracy 0.552'."""
    parts = [f"train loss {num(row.get('train/epoch_loss'))}"]
    evals = sorted((k for k in row if k.startswith("eval/")), key=lambda k: (k != "eval/loss", k))
    parts += [f"{k} {num(row[k])}" for k in evals]
    return f"dist-train: epoch {epoch}/{epochs}: {', '.join(parts)}"
