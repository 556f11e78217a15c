"""A logged step's outputs: its metrics row to every sink, a spike's line in spikes.jsonl, each module's norm in
per_layer.jsonl, and the progress line; values read from the device here, on logged steps only."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from dist_train.metrics import Sink, Window, _num, layer_norms, make_record, spike_record
from dist_train.progress import ProgressReporter, num
from dist_train.step import StepMetrics
from dist_train.trainer.setup import Setup, batch_of, per_layer_every


class Rows:
    """Writes step rows (rank 0 writes; every rank takes part in the collectives) and keeps the logging window."""

    def __init__(self, s: Setup, sinks: Sequence[Sink], progress: ProgressReporter, spike_sinks: Sequence[Sink] = (),
                 layer_sinks: Sequence[Sink] = (), epochs: bool = False):
        self.s, self.sinks, self.progress = s, sinks, progress
        self.spike_sinks, self.layer_sinks, self.epochs = spike_sinks, layer_sinks, epochs
        self.window = Window(s.device)
        self.every_layer = per_layer_every(s)

    def write(self, n: int, m: StepMetrics, lr: float, counts: tuple[int, int, int, int], advance: bool,
              t_end: Optional[float] = None, extra: Optional[dict[str, Any]] = None) -> None:
        """Step n's row; the logging window ends at t_end (a deferred row: the end of step n, not now). `extra`:
        more of the row's keys (the evaluation's, the epoch's)."""
        s = self.s
        total, consecutive, spikes, _ = counts
        record = None
        # The loss and the loss function's own metrics (accuracy), averaged over ranks in one collective.
        means = s.dist.mean(torch.stack([m.loss.float(), *m.extra.values()]))
        loss, own = means[0], {f"train/{k}": v for k, v in zip(m.extra, means[1:])}
        if s.dist.is_main:
            record = make_record(step=n, loss=loss, m=m, window=self.window, lr=lr, skipped_total=total,
                                 tokens_per_sample=s.task.tokens_per_sample, t_end=t_end,
                                 spike_skipped_total=spikes if s.skip is not None else None)
            record.update({k: _num(v.item()) for k, v in own.items()})
            if self.epochs:
                record["train/epoch"] = n / s.steps_per_epoch
            record.update(extra or {})
            for sink in self.sinks:
                sink.log(record)
            self._forensics(n, m, record)
        self.window.reset(t_end)
        if record is not None:
            self._say(n, record, consecutive)
        self.progress.step(record, advance=advance)

    def _forensics(self, n: int, m: StepMetrics, record: dict[str, Any]) -> None:
        """A spike's line in spikes.jsonl, and each module's norm on logging.per_layer_every steps."""
        s = self.s
        spike = bool(self.spike_sinks) and is_spike(m)
        per_layer = bool(self.every_layer) and n % self.every_layer == 0
        # Each module's norm (one read of the per-tensor norms), only on the rows that use it.
        layers = layer_norms(s.param_names, m.param_norms) if m.param_norms is not None and (
            spike or per_layer) else None
        if spike:
            batch = batch_of(s, n - 1)
            line = spike_record(step=n, batch=batch + 1, record=record, m=m, layers=layers,
                                top_k=s.cfg.logging.spike_top_k, samples=s.batches.indices(batch).tolist())
            for sink in self.spike_sinks:
                sink.log(line)
        if layers is not None and per_layer:
            row = {"step": n, **{f"grad_norm_layer/{k}": v for k, v in layers.items()}}
            for sink in self.layer_sinks:
                sink.log(row)

    def _say(self, n: int, record: dict[str, Any], consecutive: int) -> None:
        """A line of its own for a skipped step or a spike."""
        if record["optim/step_skipped"]:
            self.progress.message(f"dist-train: step {n}: non-finite gradient norm, optimizer step skipped "
                                  f"({consecutive} in a row)")
        elif record.get("optim/spike_skipped"):
            self.progress.message(f"dist-train: step {n}: spike ({spike_cause(record)}), optimizer step skipped; "
                                  "see spikes.jsonl")
        elif record.get("clip/spike_clipped"):
            self.progress.message(f"dist-train: step {n}: spike (grad norm {num(record['grad_norm/raw'])} > zscore "
                                  f"threshold {num(record['grad_norm/threshold'])}), clipped; see spikes.jsonl")


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
