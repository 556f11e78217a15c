"""Device choice and mixed precision (autocast context + fp16 GradScaler)."""

from __future__ import annotations

import functools

import torch

from dist_train.config import Device, Precision
from dist_train.strategies.base import Amp


def pick_device(choice: Device, local_rank: int = 0) -> torch.device:
    if choice == Device.cuda or (choice == Device.auto and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def build_amp(precision: Precision, device: torch.device) -> Amp:
    """bf16: autocast only. fp16: autocast + GradScaler (gradients unscaled before the norm)."""
    if precision == Precision.no:
        return Amp()
    dtype = torch.bfloat16 if precision == Precision.bf16 else torch.float16
    autocast = functools.partial(torch.autocast, device_type=device.type, dtype=dtype)
    scaler = torch.amp.GradScaler(device.type) if precision == Precision.fp16 else None
    return Amp(autocast=autocast, scaler=scaler)
