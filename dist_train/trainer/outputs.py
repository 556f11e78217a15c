"""Rank 0's outputs: the run directory's files and W&B, opened all or nothing, and the startup summary."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import Any, Optional

from dist_train import checkpoint as ckpt
from dist_train import config as C
from dist_train import optim
from dist_train.metrics import JsonlSink, Sink
from dist_train.preflight import skipped_batches
from dist_train.progress import count
from dist_train.rundir import RunDir
from dist_train.trainer.resume import RunState
from dist_train.trainer.setup import Setup, per_layer_every

log = logging.getLogger("dist_train")


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


def open_outputs(cfg: C.Config, s: Setup, run_dir: RunDir, resumed: Optional[RunState]) -> Outputs:
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
    t = cfg.train
    epochs = f" ({t.epochs} epochs of {s.steps_per_epoch})" if t.epochs is not None else ""
    lines = [
        f"dist-train: {s.max_steps} steps{epochs} of {t.global_batch_size} samples on {s.device}, {world}, "
        f"precision {precision}, model {count(n_params)} parameters",
        f"dist-train: task {s.task.describe()}{' (task.name=auto)' if cfg.task.name == C.TaskName.auto else ''}; "
        f"{data_line(s)}; optimizer {optim.describe(cfg.optim)}",
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
    if cfg.data.skip_steps_file is not None and not skipped_batches(dataclasses.replace(cfg.data, skip_steps=[])):
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




def data_line(s: Setup) -> str:
    """'50000 training samples (data.file 'x.pth'), 10000 validation samples, shuffled each epoch'."""
    order = "shuffled each epoch" if s.cfg.data.shuffle else "in file order (data.shuffle=false)"
    val = f", {len(s.val)} validation samples" if s.val is not None else ", no validation set"
    workers = f", {s.cfg.data.num_workers} data workers" if s.cfg.data.num_workers else ""
    return f"{len(s.dataset)} training samples ({s.dataset.what}){val}, {order}{workers}"
