"""Per-phase wall-clock seconds of a training step (generation, teacher, forward/backward, ...)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

PHASES = ("generation", "teacher", "forward_backward", "loss", "optimizer", "waiting")


class PhaseTimer:
    """Accumulates the seconds spent in each of `PHASES` during one step.

    On CUDA the device is synchronised at the end of each phase, so that asynchronous kernels are
    charged to the phase that launched them.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.synchronize = torch.device(device).type == "cuda"
        self.seconds = dict.fromkeys(PHASES, 0.0)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if name not in self.seconds:
            raise KeyError(f"unknown phase {name!r} (phases: {', '.join(PHASES)})")
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.synchronize:
                torch.cuda.synchronize()
            self.seconds[name] += time.perf_counter() - started

    def add(self, name: str, seconds: float) -> None:
        """Charge `seconds` measured elsewhere (a rollout worker's wait) to `name`."""
        self.seconds[name] += seconds
