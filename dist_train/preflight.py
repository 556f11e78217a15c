"""The checks of a config that look at this machine, run before anything is written.

`dist_train.config` is the schema and the checks of values alone; this step checks
what the values name: the files exist and hold what they must (a token file against
its sidecar, a data.file's tensors), user code imports (model.factory, data.factory,
task.loss), the device and backend exist, the model and data fit in memory, W&B has a
key where it must go online, and the strategy, precision and launcher go together.
Each is a one-line ConfigError naming the key.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

from dist_train.config import (
    Backend, Config, ConfigError, DataConfig, Device, GiB, WandbMode, parse_config, tinygpt_parameters, token_data,
)
from dist_train.config import _require
from dist_train.errors import describe
from dist_train.files import regular_file, resolve_spec


def load_config(path: Optional[str | os.PathLike], overrides: Sequence[str] = ()) -> Config:
    """Load, merge and check a config, values and what they name on this machine; raise ConfigError (one line)
    on any problem."""
    cfg = parse_config(path, overrides)
    check(cfg)
    return cfg


def check(cfg: Config) -> None:
    if cfg.logging.wandb.mode == WandbMode.online:
        from dist_train.wandb_sink import api_key_configured

        _require(
            api_key_configured(),
            "logging.wandb.mode",
            "online needs a W&B API key, and none is configured; run 'wandb login' or set WANDB_API_KEY, "
            "or use logging.wandb.mode=offline",
        )
    if cfg.model.factory is not None:
        resolve_spec(cfg.model.factory, "model.factory")
    if cfg.task.loss is not None:
        resolve_spec(cfg.task.loss, "task.loss")
    vocab_size = _check_data(cfg.data, cfg.model.block_size)
    import torch  # the checks above need none (a typo is reported at once); those below need the device

    cuda = torch.cuda.is_available()
    t = cfg.train
    if t.device == Device.cuda:
        _require(cuda, "train.device", "cuda requested but no CUDA device is available; use auto or cpu")
    if cfg.dist.backend == Backend.nccl:
        _require(
            cuda and t.device != Device.cpu,
            "dist.backend",
            "nccl needs CUDA devices, and this run trains on the CPU; use auto or gloo",
        )
    _check_fits_in_memory(cfg, vocab_size, on_gpu=cuda and t.device != Device.cpu)
    from dist_train.strategies import resolve

    resolve(cfg)  # strategy x precision x launcher: a combination that cannot work fails here


def skipped_batches(d: DataConfig) -> list[int]:
    """data.skip_steps and the batches of data.skip_steps_file, sorted, without repeats (1-based)."""
    steps = set(d.skip_steps)
    if d.skip_steps_file is not None:
        path = regular_file(d.skip_steps_file, "config key 'data.skip_steps_file': file")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"config key 'data.skip_steps_file': cannot read '{path}' ({describe(e)})") from None
        import json

        for i, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line:
                continue
            if line.startswith("{"):
                try:
                    obj = json.loads(line)
                except ValueError:
                    raise ConfigError(f"config key 'data.skip_steps_file': line {i} of '{path}' is not valid JSON "
                                      "(cut off?); mend or remove that line") from None
                if not isinstance(obj, dict) or "batch" not in obj:
                    raise ConfigError(f"config key 'data.skip_steps_file': line {i} of '{path}' is a JSON object "
                                      "without a 'batch' (is it a spikes.jsonl written by dist-train?)")
                items = [obj["batch"]]
            else:
                items = line.split()
            for item in items:
                try:
                    steps.add(int(item))
                except (TypeError, ValueError):
                    raise ConfigError(f"config key 'data.skip_steps_file': line {i} of '{path}' holds "
                                      f"'{item}', not a step number") from None
    bad = [s for s in steps if s < 1]
    if bad:
        key = "data.skip_steps" if min(bad) in d.skip_steps else "data.skip_steps_file"
        raise ConfigError(f"config key '{key}': steps are 1-based, got {min(bad)}")
    return sorted(steps)


def _check_data(d: DataConfig, block_size: int) -> Optional[int]:
    """Check the files and code the data.* keys name; the vocabulary size of token data, or a bound on it."""
    skipped_batches(d)
    if d.factory is not None:
        resolve_spec(d.factory, "data.factory")
    for key in ("file", "val_file"):
        if getattr(d, key) is not None:
            from dist_train.samples import check_tensor_file

            check_tensor_file(getattr(d, key), f"data.{key}")
    if d.text_file is not None:
        regular_file(d.text_file, "config key 'data.text_file': file")
        return 256  # unknown until the file is read; a bound for the memory check
    if d.token_file is not None:
        from dist_train.data import inspect_token_file

        return inspect_token_file(d, block_size).vocab_size
    return d.vocab_size


def _available_memory(on_gpu: bool) -> Optional[int]:
    """Bytes this process can expect to use: the GPU's memory, or the host's available memory."""
    if on_gpu:
        import torch

        return torch.cuda.get_device_properties(0).total_memory
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _check_fits_in_memory(cfg: Config, vocab_size: Optional[int], on_gpu: bool) -> None:
    """Refuse sizes that cannot fit at all, before anything is allocated or written.

    A sanity bound, not a tight one: the embedded model's weights, gradients and
    two AdamW moments in fp32 (16 bytes a parameter, activations not counted),
    and the synthetic data set held in memory (the shuffle stores nothing per sample).
    """
    available = _available_memory(on_gpu)
    if available is None:
        return
    where = "GPU" if on_gpu else "host"
    if cfg.model.factory is None and vocab_size is not None:
        n = tinygpt_parameters(cfg.model, vocab_size)
        need = 16 * n
        _require(
            need <= available,
            "model.d_model",
            f"this model has {n:.3g} parameters and needs about {need / GiB:.3g} GiB for weights, gradients and "
            f"optimizer state, more than the {available / GiB:.3g} GiB of {where} memory available; use a smaller "
            "model (model.d_model, model.n_layer)",
        )
    d = cfg.data
    if token_data(d) and d.text_file is None and d.token_file is None:
        need = d.num_samples * (cfg.model.block_size + 1) * 8  # int64 samples
        host = _available_memory(False)
        _require(
            host is None or need <= host,
            "data.num_samples",
            f"{d.num_samples} samples of model.block_size+1 tokens need about {need / GiB:.3g} GiB, more "
            f"than the {(host or 0) / GiB:.3g} GiB of host memory available; lower it",
        )

