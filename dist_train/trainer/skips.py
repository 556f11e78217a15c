"""Skipped steps and spikes, counted on the device and learnt by the host a step late."""

from __future__ import annotations

from typing import Any, Optional

import torch

from dist_train.step import StepMetrics


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


