"""Tasks: what is specific to a kind of model, in one place.

A task knows how a batch of samples goes into the model, what the loss is, what it
measures besides (accuracy), what an evaluation sums up, and what the model's output
must look like (its probe, before anything is written). The step, the trainer and the
strategies know no task.

    lm        the model maps (B, T) token ids to (B, T, V) logits: a tensor, or an object or
              dict holding `logits` (a Hugging Face causal LM, with no wrapper); next-token
              cross-entropy. Samples are windows of T + 1 tokens.
    classify  the inputs map to (B, C) logits (or `.logits`); integer labels; cross-entropy,
              and accuracy. A sample is (inputs..., label), or a dict with "labels" (or "label")
              whose other keys are the model's keyword arguments.
    model     the model computes its own loss: a dict batch is passed as keyword arguments
              (`model(**batch)`, Hugging Face's convention with `labels`), a tuple as arguments,
              a tensor as the argument; the loss is the output's `.loss`, ["loss"] or first element.
    custom    task.loss=module:function, `fn(model, batch) -> loss`, or `(loss, {name: tensor})`
              for metrics of its own (means over the batch).

Every loss is a mean over the batch's samples, so a micro-batch's share of the gradient
does not depend on how the global batch is cut (the step divides by the micro-batch
count); evaluation sums each metric over samples and divides once, over all ranks.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from dist_train.config import Config, TaskName, token_data
from dist_train.errors import ConfigError, UsageError, describe, is_out_of_memory
from dist_train.samples import Batch, Samples, TensorSamples, DatasetSamples, Subset, batch_size, source_index

LossOut = tuple[torch.Tensor, dict[str, torch.Tensor]]


class ProbeError(Exception):
    """What is wrong with a model's output on the probe batch; `run_probe` names the model before it."""


class Task:
    name = "task"
    #: Tokens a sample counts (perf/tokens_per_sec); None where samples are not token windows.
    tokens_per_sample: Optional[int] = None

    def loss(self, model: torch.nn.Module, batch: Batch) -> LossOut:
        """The mean loss over the batch's samples, and metrics of its own (means over the samples)."""
        raise NotImplementedError

    def eval_sums(self, model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        """Each evaluation metric summed over the batch's samples ("loss" among them), fp64 0-dim tensors."""
        n = batch_size(batch)
        loss, extra = self.loss(model, batch)
        return {"loss": loss.double() * n, **{k: v.double() * n for k, v in extra.items()}}

    def check_batch(self, batch: Batch, indices: torch.Tensor, samples: Samples) -> None:
        """Host-side checks of a batch before it goes to the device (no device read): e.g. labels in range."""

    def probe(self, model: torch.nn.Module, batch: Batch) -> None:
        """Check the model's output on a batch of 2 samples (eval mode, no gradients); ConfigError naming what
        the model returned and what this task needs."""

    def describe(self) -> str:
        return self.name


def output_field(out: Any, name: str) -> Any:
    """`out.name` or `out[name]` (a Hugging Face ModelOutput has both), else None."""
    if isinstance(out, dict):
        return out.get(name)
    return getattr(out, name, None)


def call(model: torch.nn.Module, inputs: Any) -> Any:
    """The model on inputs: a dict as keyword arguments, a tuple or list as arguments, else one argument."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


# ---- lm ------------------------------------------------------------------------------------------------
def logits_of(out: Any) -> Any:
    """A model's logits: the output itself, or its `logits` (Hugging Face models)."""
    if isinstance(out, torch.Tensor):
        return out
    return output_field(out, "logits")


class LanguageModel(Task):
    name = "lm"

    def __init__(self, block_size: int, vocab_size: int):
        self.tokens_per_sample = block_size
        self.vocab_size = vocab_size

    @staticmethod
    def split(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        w = batch
        return w[:, :-1], w[:, 1:]

    def loss(self, model, batch) -> LossOut:
        x, y = self.split(batch)
        logits = logits_of(model(x))
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1)), {}

    def eval_sums(self, model, batch):
        x, y = self.split(batch)
        logits = logits_of(model(x)).float()
        per_token = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none")
        per_sample = per_token.view(y.shape).double().mean(dim=1)  # each sample's mean, as the training loss
        return {"loss": per_sample.sum()}

    def probe(self, model, batch):
        x, _ = self.split(batch)
        out = model(x)
        logits = logits_of(out)
        want = (f"(2, {x.size(1)}, V) logits with V >= the vocabulary size {self.vocab_size} (a tensor, or an "
                "output with .logits; task lm)")
        if not isinstance(logits, torch.Tensor):
            raise ProbeError(f"returned {type(out).__name__} for a (2, {x.size(1)}) batch of token ids; it must "
                             f"return {want}")
        shape = tuple(logits.shape)
        if logits.dim() != 3 or shape[:2] != tuple(x.shape) or shape[-1] < self.vocab_size:
            hint = ("; 2-D logits are a classifier's (B, C): for a classifier set task.name=classify"
                    if logits.dim() == 2 else "")
            raise ProbeError(f"maps a (2, {x.size(1)}) batch of token ids to shape {shape}; expected {want}{hint}")

    def describe(self) -> str:
        return f"lm (next-token cross-entropy, vocabulary {self.vocab_size})"


# ---- classify ------------------------------------------------------------------------------------------
LABEL_KEYS = ("labels", "label")


def split_labels(batch: Batch) -> tuple[Any, torch.Tensor]:
    """(inputs, labels) of a classification batch: (inputs..., labels), or a dict with "labels" or "label"."""
    if isinstance(batch, dict):
        key = next((k for k in LABEL_KEYS if k in batch), None)
        if key is None:
            raise UsageError(f"task classify: a dict sample needs a 'labels' (or 'label') key; it has {sorted(batch)}")
        return {k: v for k, v in batch.items() if k != key}, batch[key]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        inputs = batch[:-1]
        return (inputs[0] if len(inputs) == 1 else tuple(inputs)), batch[-1]
    raise UsageError("task classify: a sample must be (inputs..., label) or a dict with 'labels'; got "
                     f"{type(batch).__name__}")


class Classify(Task):
    name = "classify"

    def __init__(self, num_classes: int):
        self.num_classes = num_classes  # from the labels; the model's own count once probed

    def logits(self, model, inputs) -> torch.Tensor:
        out = call(model, inputs)
        return logits_of(out)

    def loss(self, model, batch) -> LossOut:
        inputs, y = split_labels(batch)
        logits = self.logits(model, inputs).float()
        return F.cross_entropy(logits, y), {"accuracy": (logits.argmax(dim=1) == y).float().mean()}

    def eval_sums(self, model, batch):
        inputs, y = split_labels(batch)
        logits = self.logits(model, inputs).float()
        return {"loss": F.cross_entropy(logits, y, reduction="sum").double(),
                "accuracy": (logits.argmax(dim=1) == y).sum().double()}

    def check_batch(self, batch, indices, samples):
        _, y = split_labels(batch)
        if y.dtype.is_floating_point or y.dtype == torch.bool or y.dim() != 1:
            raise UsageError(f"task classify: {samples.what}'s labels are {str(y.dtype).replace('torch.', '')} of "
                             f"shape {tuple(y.shape)} per batch; they must be integer class indices, one per sample")
        if y.numel() == 0:
            return
        lo, hi = int(y.min()), int(y.max())  # a host tensor: no device read
        if lo < 0 or hi >= self.num_classes:
            bad = int(((y < 0) | (y >= self.num_classes)).nonzero()[0])
            i = int(source_index(samples, indices)[bad])
            raise UsageError(f"task classify: sample {i} of {samples.what} has label {int(y[bad])}, not in [0, "
                             f"{self.num_classes}): the model has {self.num_classes} classes; fix the label, or build "
                             "the model with more classes (a factory can declare num_classes)")

    def probe(self, model, batch):
        inputs, _ = split_labels(batch)
        out = call(model, inputs)
        logits = logits_of(out)
        if not isinstance(logits, torch.Tensor):
            raise ProbeError(f"returned {type(out).__name__}; task classify needs (B, C) logits (a tensor, or an "
                             "output with .logits)")
        if logits.dim() != 2 or logits.size(0) != 2:
            raise ProbeError(f"maps a batch of 2 samples to shape {tuple(logits.shape)}; task classify needs (2, C) "
                             "logits, one row of class scores per sample")
        if logits.size(1) < 2:
            raise ProbeError(f"returns {logits.size(1)} class score per sample; cross-entropy needs at least 2 "
                             "classes (task classify)")
        self.num_classes = logits.size(1)

    def describe(self) -> str:
        return f"classify ({self.num_classes} classes, cross-entropy; accuracy)"


# ---- model ---------------------------------------------------------------------------------------------
def loss_of(out: Any) -> Any:
    """The loss in a model's output: `.loss`, ["loss"], the first element, or the output itself if a tensor."""
    if isinstance(out, torch.Tensor):
        return out
    loss = output_field(out, "loss")
    if loss is None and isinstance(out, (tuple, list)) and out:
        loss = out[0]
    return loss


class OwnLoss(Task):
    name = "model"

    def loss(self, model, batch) -> LossOut:
        return loss_of(call(model, batch)), {}

    def probe(self, model, batch):
        out = call(model, batch)
        loss = loss_of(out)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            what = "no loss" if loss is None else f"a loss of shape {tuple(loss.shape)}" if isinstance(
                loss, torch.Tensor) else f"a {type(loss).__name__} as its loss"
            hint = (" (a Hugging Face model computes it when the batch holds labels)" if isinstance(batch, dict)
                    else "")
            raise ProbeError(f"returned {type(out).__name__} holding {what}; task model needs a 0-dim loss as "
                             f".loss, ['loss'] or its first element{hint}")

    def describe(self) -> str:
        return "model (the model's own loss)"


# ---- custom --------------------------------------------------------------------------------------------
class CustomLoss(Task):
    name = "custom"

    def __init__(self, spec: str, fn: Callable[..., Any], tokens_per_sample: Optional[int] = None):
        self.spec, self.fn = spec, fn
        self.tokens_per_sample = tokens_per_sample

    def loss(self, model, batch) -> LossOut:
        out = self.fn(model, batch)
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict):
            return out[0], out[1]
        return out, {}

    def probe(self, model, batch):
        try:
            loss, extra = self.loss(model, batch)
        except (ConfigError, UsageError):
            raise
        except Exception as e:
            if is_out_of_memory(e):
                raise
            raise ConfigError(f"config key 'task.loss': '{self.spec}' raised {describe(e)} on a batch of 2 "
                              "samples") from None
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ConfigError(f"config key 'task.loss': '{self.spec}' returned {type(loss).__name__}"
                              f"{' of shape ' + str(tuple(loss.shape)) if isinstance(loss, torch.Tensor) else ''}; "
                              "it must return a 0-dim loss, or (loss, {name: 0-dim tensor})")
        for k, v in extra.items():
            if not isinstance(v, torch.Tensor) or v.dim() != 0:
                raise ConfigError(f"config key 'task.loss': '{self.spec}' returned metric '{k}' as "
                                  f"{type(v).__name__}; metrics must be 0-dim tensors")

    def describe(self) -> str:
        return f"custom loss {self.spec}"


# ---- choosing the task ---------------------------------------------------------------------------------
def infer_from_data(samples: Samples) -> Optional[TaskName]:
    """The task the samples imply, where they do: a dict with labels (a model computing its loss), (inputs,
    integer label) pairs (classify), windows of token ids (lm); None: the model's output decides."""
    probe = samples.batch(torch.arange(min(2, len(samples))))
    if isinstance(probe, dict):
        return TaskName.model if "labels" in probe else None
    if isinstance(probe, (tuple, list)) and len(probe) >= 2:
        y = probe[-1]
        if isinstance(y, torch.Tensor) and y.dim() == 1 and not y.dtype.is_floating_point and y.dtype != torch.bool:
            return TaskName.classify
        return None
    if isinstance(probe, torch.Tensor) and probe.dim() == 2 and not probe.dtype.is_floating_point:
        return TaskName.lm
    return None


def labels_of(samples: Samples) -> Optional[torch.Tensor]:
    """Every label of a classification data set (num_classes is the largest + 1), read once; None if unknown."""
    if isinstance(samples, Subset):
        labels = labels_of(samples.base)
        return labels[samples.index] if labels is not None else None
    if isinstance(samples, TensorSamples):
        _, y = split_labels(samples.data)
        return y
    if isinstance(samples, DatasetSamples):
        ds = samples.dataset
        if isinstance(ds, torch.utils.data.TensorDataset):
            return ds.tensors[-1]
        # Each sample's label alone (not collated: a sample that does not batch is found in its batch, later).
        labels = [split_labels(x)[1] for x in samples.samples(list(range(len(samples))))]
        return torch.as_tensor([int(y) for y in labels])
    return None


def num_classes_of(train: Samples, val: Optional[Samples]) -> int:
    """The number of classes the labels imply: the largest label + 1 (over the training and validation sets)."""
    ds = getattr(train, "dataset", None)
    for attr in ("num_classes",):
        if isinstance(getattr(ds, attr, None), int):
            return getattr(ds, attr)
    if isinstance(getattr(ds, "classes", None), (list, tuple)):
        return len(ds.classes)
    top = -1
    for part in (train, val):
        if part is None:
            continue
        y = labels_of(part)
        if y is not None and y.numel():
            if y.dtype.is_floating_point:
                raise UsageError(f"task classify: {part.what}'s labels are {str(y.dtype).replace('torch.', '')}; "
                                 "they must be integer class indices")
            top = max(top, int(y.max()))
    return max(top + 1, 2)


def resolve_name(cfg: Config, train: Samples) -> Optional[TaskName]:
    """The task before the model exists: the one asked for, or the one the data implies (None: decided by the
    model's output)."""
    if cfg.task.name != TaskName.auto:
        return cfg.task.name
    if token_data(cfg.data):
        return TaskName.lm
    return infer_from_data(train)


def build_task(cfg: Config, name: Optional[TaskName], train: Samples, val: Optional[Samples]) -> Task:
    """The task object (the model is built after it: a classifier's factory may take num_classes). task.loss,
    when given, replaces the task's loss whatever task.name says."""
    if cfg.task.loss is not None:
        from dist_train.files import resolve_spec

        return CustomLoss(cfg.task.loss, resolve_spec(cfg.task.loss, "task.loss"),
                          cfg.model.block_size if token_data(cfg.data) else None)
    if name == TaskName.lm:
        if not token_data(cfg.data):
            probe = train.batch(torch.arange(min(2, len(train))))
            if not (isinstance(probe, torch.Tensor) and probe.dim() == 2 and not probe.dtype.is_floating_point):
                raise ConfigError(f"task lm needs samples that are windows of token ids (an integer tensor of T + 1 "
                                  f"ids each); {train.what} holds samples of {_sample_shape(probe)}: for (inputs, "
                                  "label) samples set task.name=classify, for a model computing its own loss "
                                  "task.name=model")
            if train.vocab_size is None:
                raise ConfigError(f"task lm on {train.what}: set data.vocab_size (every token id below it)")
        return LanguageModel(cfg.model.block_size if token_data(cfg.data) else
                             _window(train) - 1, train.vocab_size)
    if name == TaskName.classify:
        return Classify(num_classes_of(train, val))
    if name == TaskName.model:
        return OwnLoss()
    return Undecided()


def _sample_shape(batch: Batch) -> str:
    """One sample's structure in a batch of them: '(tensor (3, 32, 32) float32, tensor () int64)'."""
    from dist_train.samples import map_tensors, shape_of

    return shape_of(map_tensors(batch, lambda t: t[0]))


def _window(samples: Samples) -> int:
    return samples.batch(torch.arange(1)).shape[1]


class Undecided(Task):
    """task.name=auto where the samples do not say: the model's output decides (`decide`)."""

    name = "auto"


def decide(task: Task, model: torch.nn.Module, batch: Batch) -> Task:
    """An undecided task from the model's output on a probe batch: one holding a loss is `model`."""
    if not isinstance(task, Undecided):
        return task
    out = call(model, batch)
    loss = loss_of(out) if not isinstance(out, torch.Tensor) else None
    if isinstance(loss, torch.Tensor) and loss.dim() == 0:
        return OwnLoss()
    raise ConfigError("config key 'task.name': auto cannot tell the task from these samples and this model's output "
                      f"({type(out).__name__}); set task.name=classify (samples (inputs, label)), model (the model "
                      "returns its loss) or lm, or give task.loss")


def run_probe(task: Task, model: torch.nn.Module, batch: Batch, device: torch.device, what: str) -> Task:
    """Decide an undecided task and check the model's output, on `batch` (2 samples, on the device), in eval mode
    without gradients, leaving the RNG state as it was."""
    was_training = model.training
    devices = [device] if device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        model.eval()
        try:
            task = decide(task, model, batch)
            task.probe(model, batch)
        except ProbeError as e:
            raise ConfigError(f"{what} {e}") from None
        except (ConfigError, UsageError):
            raise
        except Exception as e:
            if is_out_of_memory(e):
                raise ConfigError(f"{what} ran out of memory on a batch of 2 samples; use a smaller model") from None
            raise ConfigError(f"{what} raised {describe(e)} on a batch of 2 samples") from None
        finally:
            model.train(was_training)
    return task
