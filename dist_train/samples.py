"""Samples a user has: tensors `torch.save` wrote (data.file), or a Dataset from a factory (data.factory).

Both serve a batch of samples by index (`batch(indices)`), on the host, as the
trainer's step-addressed order asks for them (dist_train.data.GlobalBatches):

- `TensorSamples`: a tuple, list or dict of tensors of equal first dimension, or one
  tensor; sample i is row i of each. Loaded with weights_only=True (no code from the
  file runs) and mmap=True (only the rows a batch takes are read), so a file larger
  than memory trains.
- `DatasetSamples`: a map-style torch Dataset; a batch is its samples collated by
  torch's `default_collate` (tensors, tuples or dicts of tensors). A sample that does
  not collate with the others is one line naming it and the shapes.
- `Subset`: some samples of another, in order (data.val_fraction's held-out part and
  what is left to train on).
"""

from __future__ import annotations

import math
import pickle
from typing import Any, Callable, Optional

import torch

from dist_train.errors import ConfigError, UsageError
from dist_train.files import declared_kwargs, regular_file, resolve_spec

Batch = Any  # a tensor, or a tuple, list or dict of them (possibly nested), first dimension the samples


class Samples:
    """A data set addressed by sample index."""

    #: What the samples are called in messages ('data.file 'x.pth'').
    what = "the data set"
    #: Token data only: the vocabulary (size, and the text of each id where known).
    vocab_size: Optional[int] = None
    itos: Optional[list[str]] = None

    def __len__(self) -> int:
        raise NotImplementedError

    def batch(self, indices: torch.Tensor) -> Batch:
        """The samples at `indices`, batched (first dimension: len(indices)), on the host."""
        raise NotImplementedError


class TensorSamples(Samples):
    def __init__(self, data: Any, what: str):
        self.data = data
        self.what = what
        self._len = _first_dim(data)

    def __len__(self) -> int:
        return self._len

    def batch(self, indices: torch.Tensor) -> Batch:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return map_tensors(self.data, lambda t: t[idx])


class DatasetSamples(Samples):
    def __init__(self, dataset: torch.utils.data.Dataset, what: str):
        self.dataset = dataset
        self.what = what
        self._len = len(dataset)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self._len

    def samples(self, indices: list[int]) -> list[Any]:
        get = getattr(self.dataset, "__getitems__", None)
        return list(get(indices)) if get is not None else [self.dataset[i] for i in indices]

    def batch(self, indices: torch.Tensor) -> Batch:
        idx = [int(i) for i in indices]
        return collate(self.samples(idx), idx, self.what)


class Subset(Samples):
    def __init__(self, base: Samples, index: torch.Tensor, what: str):
        self.base, self.index, self.what = base, index, what
        self.vocab_size, self.itos = base.vocab_size, base.itos

    def __len__(self) -> int:
        return self.index.numel()

    def batch(self, indices: torch.Tensor) -> Batch:
        return self.base.batch(self.index[torch.as_tensor(indices, dtype=torch.long)])

    def source_index(self, indices: torch.Tensor) -> torch.Tensor:
        """The indices in the data set these samples come from (messages name those)."""
        return self.index[torch.as_tensor(indices, dtype=torch.long)]


def source_index(samples: Samples, indices: torch.Tensor) -> torch.Tensor:
    return samples.source_index(indices) if isinstance(samples, Subset) else torch.as_tensor(indices)


def map_tensors(data: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    if isinstance(data, torch.Tensor):
        return fn(data)
    if isinstance(data, dict):
        return {k: map_tensors(v, fn) for k, v in data.items()}
    if isinstance(data, (tuple, list)):
        return type(data)(map_tensors(v, fn) for v in data)
    return data


def leaves(data: Any) -> list[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        return [data]
    if isinstance(data, dict):
        return [t for v in data.values() for t in leaves(v)]
    if isinstance(data, (tuple, list)):
        return [t for v in data for t in leaves(v)]
    return []


def _first_dim(data: Any) -> int:
    return leaves(data)[0].shape[0]


def batch_size(batch: Batch) -> int:
    """The number of samples in a batch: the first dimension of its first tensor."""
    return _first_dim(batch)


def to_device(batch: Batch, device: torch.device) -> Batch:
    """The batch on `device`: through page-locked memory on CUDA, so the copy runs asynchronously."""
    if device.type == "cuda":
        return map_tensors(batch, lambda t: t.pin_memory().to(device, non_blocking=True))
    return map_tensors(batch, lambda t: t.to(device))


# ---- data.file ------------------------------------------------------------------------------------------
SAVE_HINT = "save plain tensors instead, e.g. torch.save((images, labels), PATH) or torch.save({'x': x, 'y': y}, PATH)"


def load_tensor_file(path: str, key: str) -> TensorSamples:
    """What torch.save wrote to `path`, checked: tensors in a tuple, list or dict (or one tensor), of equal first
    dimension, at least one sample. A one-line ConfigError naming `key` otherwise."""
    p = regular_file(path, f"config key '{key}': file")
    where = f"config key '{key}': '{path}'"
    try:
        data = torch.load(p, weights_only=True, mmap=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise ConfigError(f"{where} holds a pickled Python object (a Dataset?), not tensors; loading it would run "
                              f"code from the file, so it is refused: {SAVE_HINT}") from None
        raise ConfigError(f"{where} is not a file torch.save wrote ({str(e).splitlines()[0]}); {SAVE_HINT}") from None
    except RuntimeError as e:
        msg = str(e).splitlines()[0]
        if "mmap" in msg or "zipfile" in msg or "zip archive" in msg:
            raise ConfigError(f"{where} is not in torch.save's zip format (an old torch's legacy format?), which a "
                              "memory map needs; load it and torch.save it again with a current torch") from None
        raise ConfigError(f"{where} is not a file torch.save wrote ({msg}); {SAVE_HINT}") from None
    except Exception as e:  # a file of another kind entirely
        raise ConfigError(f"{where} is not a file torch.save wrote ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                          f"{SAVE_HINT}") from None
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, (tuple, list)) else None
    if isinstance(data, torch.Tensor):
        items = [(0, data)]
    if items is None:
        raise ConfigError(f"{where} holds a {type(data).__name__}; it must hold tensors: a tuple or list of tensors "
                          "(e.g. (images, labels)) or a dict of tensors, of equal first dimension")
    shapes = {}
    for k, t in items:
        if not isinstance(t, torch.Tensor):
            name = f"key '{k}'" if isinstance(data, dict) else f"element {k}"
            raise ConfigError(f"{where}: {name} is a {type(t).__name__}, not a tensor; save tensors only ({SAVE_HINT})")
        if t.dim() == 0:
            raise ConfigError(f"{where}: a 0-dimensional tensor holds no samples; the first dimension is the samples")
        shapes[k] = tuple(t.shape)
    if not shapes:
        raise ConfigError(f"{where} holds no tensors")
    firsts = {s[0] for s in shapes.values()}
    if len(firsts) > 1:
        listed = ", ".join(f"{k}: {s}" for k, s in shapes.items())
        raise ConfigError(f"{where}: the tensors' first dimensions differ ({listed}); sample i is row i of every "
                          "tensor, so they must hold the same number of samples")
    if firsts == {0}:
        raise ConfigError(f"{where} holds no samples (first dimension 0)")
    return TensorSamples(data, f"data.{key.split('.')[-1]} '{path}'")


def check_tensor_file(path: str, key: str) -> None:
    load_tensor_file(path, key)  # memory-mapped: nothing but the file's index is read


# ---- data.factory ---------------------------------------------------------------------------------------
def from_factory(spec: str, cfg: Any, seed: int) -> tuple[DatasetSamples, Optional[DatasetSamples]]:
    """(train, val or None) from data.factory."""
    key = "data.factory"
    fn = resolve_spec(spec, key)
    try:
        out = fn(**declared_kwargs(fn, key, {"cfg": cfg, "seed": seed}))
    except ConfigError:
        raise
    except Exception as e:
        from dist_train.errors import describe

        raise ConfigError(f"config key '{key}': '{spec}' raised {describe(e)}") from None
    want = "a map-style torch.utils.data.Dataset, or a dict with 'train' (and optionally 'val')"
    if isinstance(out, dict):
        unknown = sorted(set(out) - {"train", "val"})
        if "train" not in out or unknown:
            raise ConfigError(f"config key '{key}': '{spec}' returned a dict with keys {sorted(out)}; it must return "
                              f"{want}")
        train, val = out["train"], out.get("val")
    else:
        train, val = out, None
    return _dataset(train, spec, "train", want), (_dataset(val, spec, "val", want) if val is not None else None)


def _dataset(ds: Any, spec: str, part: str, want: str) -> DatasetSamples:
    key = "data.factory"
    what = f"the data.factory '{spec}' {part} set"
    if isinstance(ds, torch.utils.data.IterableDataset):
        raise ConfigError(f"config key '{key}': '{spec}' returned an IterableDataset ({part}); the order guarantee "
                          "addresses samples by index, so it must be a map-style Dataset (__getitem__ and __len__)")
    if not isinstance(ds, torch.utils.data.Dataset) or not hasattr(ds, "__len__"):
        raise ConfigError(f"config key '{key}': '{spec}' returned {type(ds).__name__} ({part}), not {want}")
    try:
        n = len(ds)
    except Exception as e:
        raise ConfigError(f"config key '{key}': len() of its {part} set raised {type(e).__name__}: {e}") from None
    if n == 0:
        raise ConfigError(f"config key '{key}': '{spec}' returned an empty {part} set")
    return DatasetSamples(ds, what)


def collate(samples: list[Any], indices: list[int], what: str) -> Batch:
    """torch's default_collate; a batch it cannot make is a one-line UsageError naming the sample that does not
    fit and the shapes."""
    from torch.utils.data import default_collate

    try:
        return default_collate(samples)
    except Exception as e:
        first = shape_of(samples[0])
        for i, s in zip(indices[1:], samples[1:]):
            if shape_of(s) != first:
                raise UsageError(f"{what}: sample {i} does not batch with sample {indices[0]}: {shape_of(s)} against "
                                 f"{first}; samples must have the same structure and shapes (pad or crop them in the "
                                 "Dataset)") from None
        raise UsageError(f"{what}: samples {indices[0]}..{indices[-1]} cannot be batched by default_collate "
                         f"({type(e).__name__}: {str(e).splitlines()[0]}); a sample is {first}: return tensors, numbers, "
                         "or tuples or dicts of them") from None


def shape_of(sample: Any) -> str:
    if isinstance(sample, torch.Tensor):
        return f"tensor {tuple(sample.shape)} {str(sample.dtype).replace('torch.', '')}"
    if isinstance(sample, dict):
        return "{" + ", ".join(f"{k!r}: {shape_of(v)}" for k, v in sample.items()) + "}"
    if isinstance(sample, (tuple, list)):
        return "(" + ", ".join(shape_of(v) for v in sample) + ")"
    return type(sample).__name__


# ---- validation split -----------------------------------------------------------------------------------
def hold_out(samples: Samples, fraction: float, seed: int) -> tuple[Samples, Samples]:
    """(train, val): `fraction` of the samples, chosen by `seed` alone, held out for validation; both keep the
    data set's order. A one-line ConfigError when either part would be empty."""
    n = len(samples)
    k = math.floor(n * fraction)
    if k < 1 or k >= n:
        raise ConfigError(f"config key 'data.val_fraction': {fraction:g} of {n} samples is {k}, "
                          f"{'no validation sample' if k < 1 else 'no training sample'}; "
                          f"{'raise' if k < 1 else 'lower'} it")
    g = torch.Generator().manual_seed(20_000 + seed)
    held = torch.zeros(n, dtype=torch.bool)
    held[torch.randperm(n, generator=g)[:k]] = True
    idx = torch.arange(n)
    return (Subset(samples, idx[~held], samples.what),
            Subset(samples, idx[held], f"{samples.what} (held out: data.val_fraction)"))
